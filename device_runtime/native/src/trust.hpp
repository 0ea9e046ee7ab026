// An app's trust policy for the files it loads (lowra.device_runtime.trust is the reference; docs/FORMAT.md
// "Signed files", "Reading"): pinned keys, revocations, unsigned input, recipient, time, replay store, decryption.
// Every refusal has its own status (LOWRA_ERR_FORGED ... LOWRA_ERR_TAMPERED), as each has its own Python class.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "adapter.hpp"
#include "signed.hpp"

namespace lowra {

constexpr int64_t kClockSkewSeconds = 5 * 60;  // trust.CLOCK_SKEW

// Microseconds since the Unix epoch of an RFC 3339 time as signed files write it: YYYY-MM-DDTHH:MM:SS, an optional
// fraction of 1-6 digits, then Z or +HH:MM / -HH:MM (a time without a zone is refused, as in trust._utc).
int64_t parse_utc(const std::string& text, const std::string& what);
// "YYYY-MM-DDTHH:MM:SSZ" of microseconds since the epoch, for messages.
std::string format_utc(int64_t micros);

// trust.SequenceStore / FileSequenceStore: the newest sequence accepted per (user, subject) and its body digest,
// in memory or, once a path is set, in a JSON file rewritten atomically after every change.
class SequenceStore {
 public:
  // Read the store at `path` (a missing file is an empty store) and persist to it from now on.
  void use_file(const std::string& path);
  void check_and_record(const std::string* user_id, const std::string& subject, int64_t sequence,
                        const std::string& body_sha256, const std::string& what);

 private:
  std::mutex lock_;
  std::map<std::string, std::pair<int64_t, std::string>> seen_;
  std::string path_;
  void persist();
};

// What a signed file's claims said, kept for the checks after its body is parsed.
struct Opened {
  Body body;
  std::optional<Json> claims;  // none for an accepted unsigned file
};

class TrustPolicy {
 public:
  std::map<std::string, PublicKey> trusted;  // key id -> raw public key
  std::set<std::string> revoked;             // key ids, lower-case hex
  int allow_unsigned = -1;                   // -1: only while no key is pinned; 0: never; 1: always
  std::optional<std::string> device_id;
  std::optional<int64_t> fixed_time;  // microseconds since the epoch; none: the system clock
  SequenceStore sequences;

  // The key's id (the key pinned under it).
  std::string pin(const PublicKey& key);
  bool unsigned_allowed() const { return allow_unsigned < 0 ? trusted.empty() : allow_unsigned != 0; }
  // LOWRA_ERR_UNSIGNED unless unsigned (v1) files are allowed.
  void check_unsigned(const std::string& what) const;
  // TrustPolicy.open: the inner file's bytes (a view of `data` or decrypted) and the verified claims.
  Opened open(const uint8_t* data, uint64_t size, const std::string& format, const std::string& what,
              const std::string* user_id, const uint8_t* aes_key, size_t key_size);

 private:
  int64_t now_micros() const;
};

// trust.open_blob's check after parsing: the claims name the blob inside (adapter id and base binding).
void check_blob_claims(const Blob& blob, const Json& claims, const std::string& what);
// trust.check_base_content: a signed blob's base_content claim against the base's payload_sha256 (`content` null
// when the base cannot prove it, e.g. a model folder or an ExecuTorch program) -> LOWRA_ERR_BASE_MISMATCH.
void check_base_content(const Blob& blob, const Json* claims, const std::string* content, const std::string& where);

}  // namespace lowra

// The C ABI's handle (lowra.h): shared by the app and every base or model it is given to, so freeing it while they
// are open is safe.
struct lowra_trust {
  std::shared_ptr<lowra::TrustPolicy> policy = std::make_shared<lowra::TrustPolicy>();
};
