#include "sha256.hpp"

#include <openssl/evp.h>


#include "error.hpp"

namespace lowra {

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (!ctx_ || EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) != 1) {
    EVP_MD_CTX_free(ctx_);
    fail(LOWRA_ERR_INTERNAL, "libcrypto could not start a SHA-256 digest");
  }
}

Sha256::~Sha256() { EVP_MD_CTX_free(ctx_); }

void Sha256::update(const void* data, size_t size) {
  if (size && EVP_DigestUpdate(ctx_, data, size) != 1) fail(LOWRA_ERR_INTERNAL, "libcrypto SHA-256 update failed");
}

std::string Sha256::hex() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_DigestFinal_ex(ctx_, digest, &size) != 1) fail(LOWRA_ERR_INTERNAL, "libcrypto SHA-256 final failed");
  static const char kHex[] = "0123456789abcdef";
  std::string out(2 * size, '0');
  for (unsigned int i = 0; i < size; ++i) {
    out[2 * i] = kHex[digest[i] >> 4];
    out[2 * i + 1] = kHex[digest[i] & 15];
  }
  return out;
}

std::string float32_digest(const float* values, size_t count) {
  static_assert(sizeof(float) == 4, "float32 weights");
  Sha256 h;
  h.update(values, 4 * count);  // little-endian hosts only (container.hpp refuses others at compile time)
  return h.hex();
}

}  // namespace lowra
