// The signed envelope, "format v2" (docs/FORMAT.md "Signed files"; lowra.device_runtime.formats.signed is the
// reference): a v1 file wrapped with claims, an Ed25519 signature over every byte before it and, optionally, the
// body sealed with AES-256-GCM. Ed25519, AES-GCM, HMAC and SHA-256 come from the platform's libcrypto (OpenSSL 3).
//
// Reading order (as the Python reader): the fixed 40-byte prefix and its lengths against the file size, then the
// signature over the bytes in place, and only then the claims' JSON.
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "json.hpp"

namespace lowra {

constexpr char kSignedMagic[8] = {'L', 'O', 'W', 'R', 'A', '\0', 'S', 'G'};
constexpr uint16_t kEnvelopeVersion = 1;
constexpr uint16_t kFlagEncrypted = 0x1;
constexpr size_t kPrefixBytes = 40;  // magic, version, flags, key id, claims length, payload length
constexpr size_t kKeyIdBytes = 16;
constexpr size_t kSignatureBytes = 64;
constexpr uint32_t kMaxClaimsBytes = 64 * 1024;
constexpr size_t kNonceBytes = 12;
constexpr size_t kTagBytes = 16;
constexpr size_t kAesKeyBytes = 32;
constexpr size_t kPublicKeyBytes = 32;
constexpr int64_t kSignedVersion = 2;  // the claims' format_version
constexpr const char* kSignatureAlgorithm = "Ed25519";
constexpr const char* kCipher = "AES-256-GCM";

using PublicKey = std::array<uint8_t, kPublicKeyBytes>;

// Whether `data` starts like a signed envelope (the magic only).
bool is_signed(const uint8_t* data, uint64_t size);
// signed.key_id: hex of the first 16 bytes of sha256(raw public key).
std::string key_id(const PublicKey& key);
// signed.key_check: hex of the first 8 bytes of HMAC-SHA256(key, "lowra key check v1").
std::string key_check(const uint8_t* aes_key, size_t size);
// trust.load_public_key: 32 raw bytes, or a PEM "PUBLIC KEY" block holding an Ed25519 key (LOWRA_ERR_CONTENT else).
PublicKey load_public_key(const uint8_t* data, size_t size);
// Whether `text` is exactly 2 * n_bytes hex digits (upper or lower case; nothing else, no spaces).
bool is_hex(const std::string& text, size_t n_bytes);

// A signed file whose prefix, claims and lengths check out (the signature too, from open_envelope).
struct Envelope {
  std::string key_id;
  Json claims;
  const uint8_t* payload = nullptr;  // into the file's bytes: the body, or its ciphertext + tag when encrypted
  uint64_t payload_size = 0;
  bool encrypted = false;
  const uint8_t* signed_prefix = nullptr;  // bytes [0, 40 + C): the associated data of the encryption
  size_t signed_prefix_size = 0;
};

// The key id a signed file names, after the prefix checks (sizes, magic, version, flags, lengths).
std::string read_envelope_key_id(const uint8_t* data, uint64_t size, const std::string& what);
// signed.read_unverified: the envelope without its signature checked (never to be trusted).
Envelope read_unverified(const uint8_t* data, uint64_t size, const std::string& what);
// signed.open_envelope: the signature with `key` (LOWRA_ERR_FORGED), then read_unverified's checks.
Envelope open_envelope(const uint8_t* data, uint64_t size, const PublicKey& key, const std::string& what);

// The inner file: a view of the payload (unencrypted) or the decrypted bytes, owned here.
class Body {
 public:
  Body(const uint8_t* view, uint64_t size) : view_(view), size_(size) {}
  explicit Body(std::vector<uint8_t>&& owned) : owned_(std::move(owned)), size_(owned_.size()), is_owned_(true) {}
  const uint8_t* data() const { return is_owned_ ? owned_.data() : view_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* view_ = nullptr;
  std::vector<uint8_t> owned_;
  uint64_t size_ = 0;
  bool is_owned_ = false;
};

// signed.decrypt_payload: the body, decrypted in memory with `aes_key` (null: none given) when the envelope is
// encrypted; its sha256 must be the claims' body_sha256 (LOWRA_ERR_DECRYPTION_KEY / LOWRA_ERR_TAMPERED).
Body decrypt_payload(const Envelope& envelope, const uint8_t* aes_key, size_t key_size, const std::string& what);

// signed.decode_revocations: the key ids of a "lowra-revocations" v1 file (lower-cased).
std::set<std::string> decode_revocations(const uint8_t* data, size_t size, const std::string& what);

}  // namespace lowra
