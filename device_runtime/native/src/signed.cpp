#include "signed.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/objects.h>
#include <openssl/pem.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>

#include "error.hpp"
#include "sha256.hpp"
#include "unicode.hpp"

namespace lowra {

namespace {

const char kHex[] = "0123456789abcdef";

std::string hex(const uint8_t* data, size_t size) {
  std::string out(2 * size, '0');
  for (size_t i = 0; i < size; ++i) {
    out[2 * i] = kHex[data[i] >> 4];
    out[2 * i + 1] = kHex[data[i] & 15];
  }
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::vector<uint8_t> unhex(const std::string& text) {  // callers checked is_hex
  std::vector<uint8_t> out(text.size() / 2);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<uint8_t>(hex_value(text[2 * i]) * 16 + hex_value(text[2 * i + 1]));
  return out;
}

template <typename T>
T read_le(const uint8_t* p) {  // little-endian hosts only (container.hpp refuses others at compile time)
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

struct Prefix {
  uint16_t flags = 0;
  std::string key_id;
  uint32_t claims_size = 0;
  uint64_t payload_size = 0;
};

Prefix read_prefix(const uint8_t* data, uint64_t size, const std::string& what) {
  if (size < kPrefixBytes + kSignatureBytes)
    fail(LOWRA_ERR_TRUNCATED, what + ": " + std::to_string(size) + " bytes is too short for a signed lowra file");
  if (!is_signed(data, size))
    fail(LOWRA_ERR_UNSUPPORTED_FORMAT, what + ": not a signed lowra file (expected the magic LOWRA\\x00SG)");
  const auto version = read_le<uint16_t>(data + 8);
  if (version != kEnvelopeVersion)
    fail(LOWRA_ERR_UNSUPPORTED_FORMAT, what + ": signed envelope version " + std::to_string(version) +
                                           "; this runtime reads version 1. Upgrade lowra");
  Prefix p;
  p.flags = read_le<uint16_t>(data + 10);
  if (p.flags & ~kFlagEncrypted)
    fail(LOWRA_ERR_CONTENT, what + ": unknown envelope flags " + std::to_string(p.flags) +
                                "; only bit 0 (encrypted) is defined");
  p.key_id = hex(data + 12, kKeyIdBytes);
  p.claims_size = read_le<uint32_t>(data + 28);
  p.payload_size = read_le<uint64_t>(data + 32);
  if (p.claims_size < 1 || p.claims_size > kMaxClaimsBytes)
    fail(LOWRA_ERR_CONTENT, what + ": claims length " + std::to_string(p.claims_size) + " outside 1.." +
                                std::to_string(kMaxClaimsBytes));
  const uint64_t fixed = kPrefixBytes + p.claims_size + kSignatureBytes;
  if (p.payload_size > size || fixed > size - p.payload_size)
    fail(LOWRA_ERR_TRUNCATED, what + ": the prefix announces " +
                                  (p.payload_size > UINT64_MAX - fixed ? std::string("more than 2^64")
                                                                       : std::to_string(fixed + p.payload_size)) +
                                  " bytes but the file has " + std::to_string(size) + "; truncated");
  if (fixed + p.payload_size < size)
    fail(LOWRA_ERR_CONTENT, what + ": " + std::to_string(size - fixed - p.payload_size) +
                                " bytes follow the signature; trailing bytes are refused");
  return p;
}

bool is_integer_in(const Json* v, int64_t low) {
  return v && v->int_in(low, (int64_t{1} << 53) - 1);
}

// signed._parse_claims: canonical ASCII JSON with exactly CLAIM_KEYS, each of its type.
Json parse_claims(const uint8_t* raw, size_t size, const std::string& what) {
  static const char* const kKeys[] = {"alg",         "base_content", "base_fingerprint", "body_bytes", "body_sha256",
                                      "device_id",   "encryption",   "expires_at",       "format",     "format_version",
                                      "issued_at",   "sequence",     "subject",          "user_id"};  // sorted
  const std::string text(reinterpret_cast<const char*>(raw), size);
  if (std::any_of(text.begin(), text.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; }))
    fail(LOWRA_ERR_CONTENT, what + ": claims are not canonical ASCII JSON (a byte >= 0x80)");
  Json claims;
  std::string error;
  if (!parse_json(text, claims, error))
    fail(LOWRA_ERR_CONTENT, what + ": claims are not canonical ASCII JSON (" + error.substr(0, 200) + ")");
  if (!claims.is_object()) fail(LOWRA_ERR_CONTENT, what + ": claims are a " + claims.type_name() + ", expected an object");
  std::vector<std::string> keys;
  for (const auto& m : claims.members) keys.push_back(m.first);
  std::sort(keys.begin(), keys.end());
  if (!std::equal(keys.begin(), keys.end(), std::begin(kKeys), std::end(kKeys)))
    fail(LOWRA_ERR_CONTENT, what + ": claims have " + std::to_string(keys.size()) +
                                " keys that are not the 14 expected (alg, base_content, ..., user_id)");
  if (canonical_json(claims) != text)
    fail(LOWRA_ERR_CONTENT, what + ": claims are not in canonical form (sorted keys, compact)");
  const std::pair<const char*, int64_t> ints[] = {{"format_version", 1}, {"sequence", 1}, {"body_bytes", 0}};
  for (const auto& [key, low] : ints)
    if (!is_integer_in(claims.find(key), low))
      fail(LOWRA_ERR_CONTENT, what + ": claim '" + key + "' = " + claims.find(key)->brief(40) +
                                  " is not an integer in [" + std::to_string(low) + ", 2**53)");
  for (const char* key : {"alg", "format", "subject", "issued_at", "body_sha256"})
    if (!claims.find(key)->is_string()) fail(LOWRA_ERR_CONTENT, what + ": claim '" + key + "' must be a string");
  for (const char* key : {"user_id", "device_id", "base_fingerprint", "base_content", "expires_at"}) {
    const Json* v = claims.find(key);
    if (v->kind != Json::Kind::Null && !v->is_string())
      fail(LOWRA_ERR_CONTENT, what + ": claim '" + key + "' must be a string or null");
  }
  if (claims.find("alg")->text != kSignatureAlgorithm)
    fail(LOWRA_ERR_CONTENT, what + ": signature algorithm " + claims.find("alg")->brief() + ", expected 'Ed25519'");
  const Json* enc = claims.find("encryption");
  if (enc->kind != Json::Kind::Null) {
    bool ok = enc->is_object() && enc->members.size() == 3;
    const Json* alg = ok ? enc->find("alg") : nullptr;
    const Json* nonce = ok ? enc->find("nonce") : nullptr;
    const Json* check = ok ? enc->find("key_check") : nullptr;
    ok = alg && nonce && check && alg->is_string() && alg->text == kCipher && nonce->is_string() &&
         is_hex(nonce->text, kNonceBytes) && check->is_string() && is_hex(check->text, 8);
    if (!ok)
      fail(LOWRA_ERR_CONTENT, what + ": claim 'encryption' must be {alg: 'AES-256-GCM', nonce: 12-byte hex, key_check}");
  }
  return claims;
}

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct MdCtxFree {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); }
};
struct BioFree {
  void operator()(BIO* p) const { BIO_free(p); }
};

bool ed25519_verify(const PublicKey& key, const uint8_t* message, uint64_t size, const uint8_t* signature) {
  std::unique_ptr<EVP_PKEY, PkeyFree> pkey(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, key.data(), key.size()));
  std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
  bool ok = pkey && ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) == 1 &&
            EVP_DigestVerify(ctx.get(), signature, kSignatureBytes, message, size) == 1;
  ERR_clear_error();  // a refused signature leaves reasons in the thread's queue; they are not ours to report
  return ok;
}

// AES-256-GCM open; false when the tag does not authenticate.
bool aes_gcm_open(const uint8_t* key, const uint8_t* nonce, const uint8_t* aad, size_t aad_size, const uint8_t* sealed,
                  uint64_t sealed_size, std::vector<uint8_t>& out) {
  const uint64_t size = sealed_size - kTagBytes;
  out.assign(size, 0);
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  bool ok = ctx && EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceBytes), nullptr) == 1 &&
            EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, key, nonce) == 1 &&
            EVP_DecryptUpdate(ctx.get(), nullptr, &len, aad, static_cast<int>(aad_size)) == 1;
  for (uint64_t done = 0; ok && done < size;) {  // EVP takes int lengths: 1 GiB at a time
    const int step = static_cast<int>(std::min<uint64_t>(size - done, uint64_t{1} << 30));
    ok = EVP_DecryptUpdate(ctx.get(), out.data() + done, &len, sealed + done, step) == 1;
    done += static_cast<uint64_t>(step);
  }
  uint8_t tag[kTagBytes];
  std::memcpy(tag, sealed + size, kTagBytes);
  uint8_t tail[32];
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) == 1 &&
       EVP_DecryptFinal_ex(ctx.get(), tail, &len) == 1;
  ERR_clear_error();
  if (!ok) OPENSSL_cleanse(out.data(), out.size());
  return ok;
}

}  // namespace

bool is_signed(const uint8_t* data, uint64_t size) {
  return size >= sizeof kSignedMagic && std::memcmp(data, kSignedMagic, sizeof kSignedMagic) == 0;
}

std::string key_id(const PublicKey& key) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(key.data(), key.size(), digest, &size, EVP_sha256(), nullptr) != 1)
    fail(LOWRA_ERR_INTERNAL, "libcrypto SHA-256 failed");
  return hex(digest, kKeyIdBytes);
}

std::string key_check(const uint8_t* aes_key, size_t size) {
  static const char kLabel[] = "lowra key check v1";
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_size = 0;
  if (!HMAC(EVP_sha256(), aes_key, static_cast<int>(size), reinterpret_cast<const unsigned char*>(kLabel),
            sizeof kLabel - 1, mac, &mac_size))
    fail(LOWRA_ERR_INTERNAL, "libcrypto HMAC-SHA256 failed");
  return hex(mac, 8);
}

bool is_hex(const std::string& text, size_t n_bytes) {
  return text.size() == 2 * n_bytes && std::all_of(text.begin(), text.end(), [](char c) { return hex_value(c) >= 0; });
}

PublicKey load_public_key(const uint8_t* data, size_t size) {
  PublicKey key{};
  if (size == kPublicKeyBytes) {
    std::copy(data, data + size, key.begin());
    return key;
  }
  if (size > (1u << 16))
    fail(LOWRA_ERR_CONTENT, "not an Ed25519 public key: " + std::to_string(size) +
                                " bytes (expected 32 raw bytes or a PEM public key)");
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(data, static_cast<int>(size)));
  std::unique_ptr<EVP_PKEY, PkeyFree> pkey(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  ERR_clear_error();
  if (!pkey) fail(LOWRA_ERR_CONTENT, "not an Ed25519 public key (PEM or 32 raw bytes)");
  if (EVP_PKEY_get_base_id(pkey.get()) != EVP_PKEY_ED25519)
    fail(LOWRA_ERR_CONTENT, std::string("public key is ") + OBJ_nid2sn(EVP_PKEY_get_base_id(pkey.get())) +
                                ", expected Ed25519");
  size_t raw = key.size();
  if (EVP_PKEY_get_raw_public_key(pkey.get(), key.data(), &raw) != 1 || raw != key.size())
    fail(LOWRA_ERR_INTERNAL, "libcrypto could not export the Ed25519 public key");
  return key;
}

std::string read_envelope_key_id(const uint8_t* data, uint64_t size, const std::string& what) {
  return read_prefix(data, size, what).key_id;
}

Envelope read_unverified(const uint8_t* data, uint64_t size, const std::string& what) {
  Prefix p = read_prefix(data, size, what);
  Envelope e;
  e.key_id = p.key_id;
  e.signed_prefix = data;
  e.signed_prefix_size = kPrefixBytes + p.claims_size;
  e.payload = data + e.signed_prefix_size;
  e.payload_size = p.payload_size;
  e.claims = parse_claims(data + kPrefixBytes, p.claims_size, what);
  e.encrypted = (p.flags & kFlagEncrypted) != 0;
  if (e.encrypted != (e.claims.find("encryption")->kind != Json::Kind::Null))
    fail(LOWRA_ERR_CONTENT, what + ": the encrypted flag and the claims' encryption entry disagree");
  const uint64_t body = static_cast<uint64_t>(e.claims.find("body_bytes")->integer);
  const uint64_t expected = body + (e.encrypted ? kTagBytes : 0);
  if (p.payload_size != expected)
    fail(LOWRA_ERR_CONTENT, what + ": payload is " + std::to_string(p.payload_size) + " bytes, the claims say " +
                                std::to_string(expected));
  return e;
}

Envelope open_envelope(const uint8_t* data, uint64_t size, const PublicKey& key, const std::string& what) {
  const std::string named = read_prefix(data, size, what).key_id;
  const std::string given = key_id(key);
  if (named != given)
    fail(LOWRA_ERR_FORGED, what + ": signed by key " + named + ", but the key given has id " + given);
  if (!ed25519_verify(key, data, size - kSignatureBytes, data + size - kSignatureBytes))
    fail(LOWRA_ERR_FORGED, what + ": the Ed25519 signature does not match key " + named +
                               "; the file was modified after signing or forged. Re-download it");
  return read_unverified(data, size, what);
}

Body decrypt_payload(const Envelope& envelope, const uint8_t* aes_key, size_t key_size, const std::string& what) {
  Body body(envelope.payload, envelope.payload_size);
  if (envelope.encrypted) {
    const Json& enc = *envelope.claims.find("encryption");
    const std::string& expected_check = enc.find("key_check")->text;
    if (aes_key == nullptr)
      fail(LOWRA_ERR_DECRYPTION_KEY, what + " is encrypted; pass the user's 32-byte key");
    const std::string check = key_size == kAesKeyBytes ? key_check(aes_key, key_size) : std::string();
    if (key_size != kAesKeyBytes || check.size() != expected_check.size() ||
        CRYPTO_memcmp(check.data(), expected_check.data(), check.size()) != 0)
      fail(LOWRA_ERR_DECRYPTION_KEY, what + ": the decryption key does not match the one it was sealed with (key "
                                            "check " + expected_check + "); fetch this user's key from the app's "
                                            "key store");
    std::vector<uint8_t> plain;
    const std::vector<uint8_t> nonce = unhex(enc.find("nonce")->text);
    if (!aes_gcm_open(aes_key, nonce.data(), envelope.signed_prefix, envelope.signed_prefix_size, envelope.payload,
                      envelope.payload_size, plain))
      fail(LOWRA_ERR_TAMPERED, what + ": the encrypted payload fails authentication under the right key; it was "
                                      "tampered with");
    body = Body(std::move(plain));
  }
  Sha256 h;
  h.update(body.data(), body.size());
  if (h.hex() != envelope.claims.find("body_sha256")->text)
    fail(LOWRA_ERR_TAMPERED, what + ": the payload does not hash to the signed body_sha256");
  return body;
}

std::set<std::string> decode_revocations(const uint8_t* data, size_t size, const std::string& what) {
  const std::string expected = what + ": expected {format: 'lowra-revocations', format_version: 1, revoked: [key ids]}";
  if (size > (16u << 20)) fail(LOWRA_ERR_CONTENT, what + " is " + std::to_string(size) + " bytes; at most 16 MiB");
  Json doc;
  std::string error;
  if (!valid_utf8(std::string_view(reinterpret_cast<const char*>(data), size)) ||
      !parse_json(std::string_view(reinterpret_cast<const char*>(data), size), doc, error))
    fail(LOWRA_ERR_CONTENT, what + " is not valid JSON (" + (error.empty() ? "not UTF-8" : error.substr(0, 200)) + ")");
  const Json* format = doc.is_object() ? doc.find("format") : nullptr;
  const Json* version = doc.is_object() ? doc.find("format_version") : nullptr;
  const Json* revoked = doc.is_object() ? doc.find("revoked") : nullptr;
  if (!format || !format->is_string() || format->text != "lowra-revocations" || !version ||
      !version->int_in(1, 1) || !revoked || !revoked->is_array())
    fail(LOWRA_ERR_CONTENT, expected);
  std::set<std::string> ids;
  for (const Json& id : revoked->items) {
    if (!id.is_string() || !is_hex(id.text, kKeyIdBytes)) fail(LOWRA_ERR_CONTENT, expected);
    std::string lower = id.text;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](char c) { return c >= 'A' && c <= 'F' ? c + 32 : c; });
    ids.insert(lower);
  }
  return ids;
}

}  // namespace lowra
