// SHA-256 through the platform's libcrypto (OpenSSL 3 EVP): payload checksums, tensor digests, fingerprints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

typedef struct evp_md_ctx_st EVP_MD_CTX;

namespace lowra {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, size_t size);
  void update(std::string_view text) { update(text.data(), text.size()); }
  // The digest as 64 lowercase hex digits (like hashlib's hexdigest()); the object is spent afterwards.
  std::string hex();

 private:
  EVP_MD_CTX* ctx_;
};

// sha256 of float32 values as contiguous little-endian bytes: formats.tensor_digest.
std::string float32_digest(const float* values, size_t count);

}  // namespace lowra
