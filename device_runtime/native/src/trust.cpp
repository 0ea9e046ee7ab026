#include "trust.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "error.hpp"
#include "mapped_file.hpp"
#include "unicode.hpp"

namespace lowra {

namespace {

constexpr int64_t kMicros = 1000000;
constexpr uint64_t kMaxStoreBytes = 64ull << 20;

// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const int64_t yoe = y - era * 400;
  const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

bool leap(int64_t y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

bool digits(const std::string& s, size_t at, size_t n, int64_t& value) {
  if (at + n > s.size()) return false;
  value = 0;
  for (size_t i = at; i < at + n; ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    value = value * 10 + (s[i] - '0');
  }
  return true;
}

std::string io_error(const std::string& what) { return what + ": " + std::strerror(errno); }

// Write `data` to `path` so the path holds the old or the new content, never half of one (_files.atomic_write_bytes).
void atomic_write(const std::string& path, const std::string& data) {
  const size_t slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "." : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, "%08x", static_cast<unsigned>(std::random_device{}()));
  const std::string tmp = folder + "/." + name + ".tmp-" + std::to_string(getpid()) + "-" + suffix;
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail(LOWRA_ERR_IO, io_error("cannot write the sequence store " + tmp));
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string message = io_error("writing the sequence store " + tmp);
      ::close(fd);
      ::unlink(tmp.c_str());
      fail(LOWRA_ERR_IO, message);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string message = io_error("saving the sequence store " + path);
    ::unlink(tmp.c_str());
    fail(LOWRA_ERR_IO, message);
  }
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {  // the rename survives a power cut once its folder is synced
    ::fsync(dir);
    ::close(dir);
  }
}

std::string store_key(const std::string* user_id, const std::string& subject) {
  return (user_id ? *user_id : std::string()) + '\x1f' + subject;
}

std::string printable(const Json* value) {  // a claim for a message: 'text' or None, as Python's repr writes it
  return value == nullptr || value->kind == Json::Kind::Null ? "None" : short_repr(value->text);
}

}  // namespace

int64_t parse_utc(const std::string& text, const std::string& what) {
  // YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|+HH:MM|-HH:MM)
  const std::string bad = what + ": " + short_repr(text, 40) + " is not an ISO-8601 time";
  int64_t y, mo, d, h, mi, s;
  if (!digits(text, 0, 4, y) || text.size() < 19 || text[4] != '-' || !digits(text, 5, 2, mo) || text[7] != '-' ||
      !digits(text, 8, 2, d) || text[10] != 'T' || !digits(text, 11, 2, h) || text[13] != ':' ||
      !digits(text, 14, 2, mi) || text[16] != ':' || !digits(text, 17, 2, s))
    fail(LOWRA_ERR_CONTENT, bad);
  static const int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > kDays[mo - 1] + (mo == 2 && leap(y)) || h > 23 || mi > 59 || s > 59)
    fail(LOWRA_ERR_CONTENT, bad);
  size_t at = 19;
  int64_t micros = 0;
  if (at < text.size() && text[at] == '.') {
    size_t n = 0;
    while (at + 1 + n < text.size() && text[at + 1 + n] >= '0' && text[at + 1 + n] <= '9') ++n;
    if (n < 1 || n > 6) fail(LOWRA_ERR_CONTENT, bad);
    digits(text, at + 1, n, micros);
    for (size_t i = n; i < 6; ++i) micros *= 10;
    at += 1 + n;
  }
  int64_t offset = 0;
  if (at < text.size() && text[at] == 'Z') {
    at += 1;
  } else if (at < text.size() && (text[at] == '+' || text[at] == '-')) {
    int64_t oh, om;
    if (!digits(text, at + 1, 2, oh) || at + 3 >= text.size() || text[at + 3] != ':' || !digits(text, at + 4, 2, om) ||
        oh > 23 || om > 59)
      fail(LOWRA_ERR_CONTENT, bad);
    offset = (text[at] == '-' ? -1 : 1) * (oh * 3600 + om * 60);
    at += 6;
  } else {
    fail(LOWRA_ERR_CONTENT, what + ": time " + short_repr(text, 40) + " has no time zone; signed times are UTC");
  }
  if (at != text.size()) fail(LOWRA_ERR_CONTENT, bad);
  const int64_t seconds = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset;
  return seconds * kMicros + micros;
}

std::string format_utc(int64_t micros) {
  int64_t seconds = micros / kMicros - (micros % kMicros < 0);
  int64_t days = seconds / 86400 - (seconds % 86400 < 0);
  const int64_t rest = seconds - days * 86400;
  // civil_from_days
  days += 719468;
  const int64_t era = (days >= 0 ? days : days - 146096) / 146097;
  const int64_t doe = days - era * 146097;
  const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const int64_t mp = (5 * doy + 2) / 153;
  const int64_t d = doy - (153 * mp + 2) / 5 + 1;
  const int64_t m = mp + (mp < 10 ? 3 : -9);
  const int64_t y = yoe + era * 400 + (m <= 2);
  char out[96];
  std::snprintf(out, sizeof out, "%04lld-%02lld-%02lldT%02lld:%02lld:%02lldZ", static_cast<long long>(y),
                static_cast<long long>(m), static_cast<long long>(d), static_cast<long long>(rest / 3600),
                static_cast<long long>(rest / 60 % 60), static_cast<long long>(rest % 60));
  return out;
}

void SequenceStore::use_file(const std::string& path) {
  std::map<std::string, std::pair<int64_t, std::string>> loaded;
  std::ifstream in(path, std::ios::binary);
  if (in) {
    const std::string corrupt = "sequence store " + path + " is corrupt (";
    std::ostringstream buffer;
    buffer << in.rdbuf();
    const std::string text = buffer.str();
    if (text.size() > kMaxStoreBytes) fail(LOWRA_ERR_CONTENT, corrupt + "larger than 64 MiB); restore it from a backup");
    Json doc;
    std::string error;
    if (!valid_utf8(text) || !parse_json(text, doc, error))
      fail(LOWRA_ERR_CONTENT, corrupt + (error.empty() ? "not UTF-8" : error) + "); restore it from a backup");
    if (!doc.is_object()) fail(LOWRA_ERR_CONTENT, corrupt + "not a JSON object); restore it from a backup");
    for (const auto& [key, value] : doc.members) {
      if (!value.is_array() || value.items.size() != 2 || !value.items[0].int_in(INT64_MIN, INT64_MAX) ||
          !value.items[1].is_string())
        fail(LOWRA_ERR_CONTENT, corrupt + "entry " + short_repr(key) + " is not [sequence, sha256]); restore it "
                                          "from a backup");
      loaded[key] = {value.items[0].integer, value.items[1].text};
    }
  } else if (path_kind(path) != PathKind::Missing) {
    fail(LOWRA_ERR_IO, io_error("cannot read the sequence store " + path));
  }
  std::lock_guard<std::mutex> guard(lock_);
  seen_ = std::move(loaded);
  path_ = path;
}

void SequenceStore::check_and_record(const std::string* user_id, const std::string& subject, int64_t sequence,
                                     const std::string& body_sha256, const std::string& what) {
  const std::string key = store_key(user_id, subject);
  const std::string who = (user_id ? short_repr(*user_id) : std::string("None"));
  std::lock_guard<std::mutex> guard(lock_);
  auto it = seen_.find(key);
  if (it != seen_.end()) {
    if (sequence < it->second.first)
      fail(LOWRA_ERR_REPLAYED, what + ": sequence " + std::to_string(sequence) + " for user " + who + " / " +
                                   short_repr(subject) + " is older than the accepted " +
                                   std::to_string(it->second.first) + "; refusing a replayed or rolled-back file");
    if (sequence == it->second.first && body_sha256 != it->second.second)
      fail(LOWRA_ERR_REPLAYED, what + ": sequence " + std::to_string(sequence) + " was already accepted for user " +
                                   who + " with other content; every re-issue needs a higher sequence");
  }
  const auto previous = it == seen_.end() ? std::optional<std::pair<int64_t, std::string>>() : it->second;
  seen_[key] = {sequence, body_sha256};
  try {
    persist();
  } catch (...) {  // not recorded when it could not be saved: the file and the memory agree
    if (previous) seen_[key] = *previous;
    else seen_.erase(key);
    throw;
  }
}

void SequenceStore::persist() {
  if (path_.empty()) return;
  std::string out = "{";
  for (const auto& [key, value] : seen_) {  // std::map: sorted by bytes, i.e. by code point
    if (out.size() > 1) out += ',';
    append_json_string(out, key);
    out += ":[" + std::to_string(value.first) + ",";
    append_json_string(out, value.second);
    out += "]";
  }
  out += "}\n";
  atomic_write(path_, out);
}

std::string TrustPolicy::pin(const PublicKey& key) {
  std::string id = key_id(key);
  trusted[id] = key;
  return id;
}

void TrustPolicy::check_unsigned(const std::string& what) const {
  if (!unsigned_allowed())
    fail(LOWRA_ERR_UNSIGNED, what + " is not signed (format v1) and this app only accepts files signed by its pinned "
                                    "keys; sign it with `lowra sign` or allow unsigned input explicitly");
}

int64_t TrustPolicy::now_micros() const {
  if (fixed_time) return *fixed_time;
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Opened TrustPolicy::open(const uint8_t* data, uint64_t size, const std::string& format, const std::string& what,
                         const std::string* user_id, const uint8_t* aes_key, size_t key_size) {
  if (!is_signed(data, size)) {
    check_unsigned(what);
    return Opened{Body(data, size), std::nullopt};
  }
  // The signature first (TrustPolicy.verify): a revoked key, a key not pinned, a bad signature.
  const std::string kid = read_envelope_key_id(data, size, what);
  if (revoked.count(kid))
    fail(LOWRA_ERR_REVOKED_KEY, what + " is signed by key " + kid + ", which is revoked; ask the server for a "
                                       "re-signed file");
  auto key = trusted.find(kid);
  if (key == trusted.end()) {
    std::string pinned;
    for (const auto& [id, _] : trusted) pinned += (pinned.empty() ? "" : ", ") + id;
    fail(LOWRA_ERR_UNTRUSTED_KEY, what + " is signed by key " + kid + ", which this app does not trust (pinned: [" +
                                      pinned + "])");
  }
  Envelope envelope = open_envelope(data, size, key->second, what);
  const Json& claims = envelope.claims;
  const Json& fmt = *claims.find("format");
  if (fmt.text != format || claims.find("format_version")->integer != kSignedVersion)
    fail(LOWRA_ERR_CONTENT, what + ": signed claims are for " + short_repr(fmt.text) + " v" +
                                claims.find("format_version")->text + ", expected '" + format + "' v2");
  // Recipient.
  const Json* claimed_user = claims.find("user_id");
  if (user_id && (!claimed_user->is_string() || claimed_user->text != *user_id))
    fail(LOWRA_ERR_WRONG_RECIPIENT, what + " belongs to user " + printable(claimed_user) + ", not to " +
                                        short_repr(*user_id) + "; refusing a swapped file");
  const Json* device = claims.find("device_id");
  if (device->is_string() && (!device_id || device->text != *device_id))
    fail(LOWRA_ERR_WRONG_RECIPIENT, what + " is bound to device " + short_repr(device->text) + "; this device is " +
                                        (device_id ? short_repr(*device_id) : std::string("None")));
  // Time, with the clock skew tolerated both ways.
  const int64_t now = now_micros();
  const std::string& issued_text = claims.find("issued_at")->text;
  if (parse_utc(issued_text, what) > now + kClockSkewSeconds * kMicros)
    fail(LOWRA_ERR_EXPIRED, what + " claims to be issued at " + issued_text + ", in the future (" + format_utc(now) + ")");
  const Json* expires = claims.find("expires_at");
  if (expires->is_string() && parse_utc(expires->text, what) < now - kClockSkewSeconds * kMicros)
    fail(LOWRA_ERR_EXPIRED, what + " expired at " + expires->text + "; ask the server for a fresh file");
  Body body = decrypt_payload(envelope, aes_key, key_size, what);
  sequences.check_and_record(claimed_user->is_string() ? &claimed_user->text : nullptr, claims.find("subject")->text,
                             claims.find("sequence")->integer, claims.find("body_sha256")->text, what);
  return Opened{std::move(body), std::move(envelope.claims)};
}

void check_blob_claims(const Blob& blob, const Json& claims, const std::string& what) {
  const Json* fingerprint = claims.find("base_fingerprint");
  if (claims.find("subject")->text != blob.adapter_id || !fingerprint->is_string() ||
      fingerprint->text != blob.base_fingerprint)
    fail(LOWRA_ERR_CONTENT, what + ": the signed claims name adapter " + short_repr(claims.find("subject")->text) +
                                " on base " + printable(fingerprint).substr(0, 24) + "..., the blob inside is " +
                                short_repr(blob.adapter_id) + " on " + blob.base_fingerprint.substr(0, 23) + "...");
}

void check_base_content(const Blob& blob, const Json* claims, const std::string* content, const std::string& where) {
  const Json* claimed = claims ? claims->find("base_content") : nullptr;
  if (claimed == nullptr || !claimed->is_string()) return;
  if (content == nullptr)
    fail(LOWRA_ERR_BASE_MISMATCH, "adapter " + short_repr(blob.adapter_id) + " is signed for base content " +
                                      claimed->text.substr(0, 16) + "..., but " + where + " cannot prove its content "
                                      "(load the signed quantized base file it was made for)");
  if (claimed->text != *content)
    fail(LOWRA_ERR_BASE_MISMATCH, "adapter " + short_repr(blob.adapter_id) + " is signed for base content " +
                                      claimed->text.substr(0, 16) + "..., " + where + " has " + content->substr(0, 16) +
                                      "...: the base was edited or is another quantization. Load the base it was "
                                      "made for");
}

}  // namespace lowra
