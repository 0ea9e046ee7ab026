#include "container.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <unordered_set>

#include "error.hpp"
#include "sha256.hpp"
#include "unicode.hpp"

namespace lowra {
namespace {

struct DtypeEntry {
  const char* name;
  size_t size;
  const char* numpy;
};

// container.DTYPES (BF16 is held as little-endian uint16 by numpy).
constexpr DtypeEntry kDtypes[] = {
    {"BF16", 2, "<u2"}, {"BOOL", 1, "|b1"}, {"F16", 2, "<f2"}, {"F32", 4, "<f4"}, {"F64", 8, "<f8"},
    {"I16", 2, "<i2"},  {"I32", 4, "<i4"},  {"I64", 8, "<i8"}, {"I8", 1, "|i1"},  {"U8", 1, "|u1"},
};

const DtypeEntry* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

std::string known_dtypes() {
  std::string out = "[";
  for (const auto& d : kDtypes) out += std::string(out.size() > 1 ? ", '" : "'") + d.name + "'";
  return out + "]";
}

std::string list_text(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

// container._int: an integer (not a bool, not a float) in [low, high].
int64_t checked_int(const Json& value, int64_t low, int64_t high, const std::string& what, const std::string& field) {
  if (!value.int_in(low, high))
    fail(LOWRA_ERR_BLOB, what + ": " + field + " is " + value.brief() + ", expected an integer in [" +
                             std::to_string(low) + ", " + std::to_string(high) + "]");
  return value.integer;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorInfo* Header::find(const std::string& name) const {
  auto it = index.find(name);
  return it == index.end() ? nullptr : &tensors[it->second];
}

size_t dtype_size(const std::string& dtype) { return find_dtype(dtype)->size; }
const char* numpy_dtype_str(const std::string& dtype) { return find_dtype(dtype)->numpy; }

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int shift = 0;
    while (!(mantissa & 0x400)) mantissa <<= 1, ++shift;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | ((mantissa & 0x3FF) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

uint16_t float_to_half(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  x &= 0x7FFFFFFF;
  if (x >= 0x7F800000) return static_cast<uint16_t>(sign | 0x7C00 | (x > 0x7F800000 ? 0x200 : 0));  // inf, NaN
  if (x >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // >= 65520 rounds past 65504: infinity
  if (x < 0x38800000) {  // below 2^-14: a subnormal half, round(|value| * 2^24) (the scaling is exact)
    float magnitude;
    std::memcpy(&magnitude, &x, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f)));
  }
  uint32_t half = ((((x >> 23) - 112) << 10) | ((x & 0x7FFFFF) >> 13));  // exponent rebiased (127 -> 15), 10 bits
  const uint32_t rest = x & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;  // to nearest even; a carry moves into the exponent
  return static_cast<uint16_t>(sign | half);
}

#if defined(__x86_64__) && !defined(LOWRA_NO_F16C)
namespace {
__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(const float* values, size_t count, uint16_t* out) {
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < count; ++i) out[i] = float_to_half(values[i]);
}
}  // namespace
#endif

void floats_to_halves(const float* values, size_t count, uint16_t* out) {
#if defined(__x86_64__) && !defined(LOWRA_NO_F16C)
  static const bool f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  if (f16c) return floats_to_halves_f16c(values, count, out);
#endif
  for (size_t i = 0; i < count; ++i) out[i] = float_to_half(values[i]);
}

void to_float32(const std::string& dtype, const uint8_t* p, size_t count, float* out, bool bf16_as_float) {
  if (dtype == "F32") {
    std::memcpy(out, p, 4 * count);
  } else if (dtype == "F16") {
    for (size_t i = 0; i < count; ++i) out[i] = half_to_float(load<uint16_t>(p + 2 * i));
  } else if (dtype == "BF16" && bf16_as_float) {
    for (size_t i = 0; i < count; ++i) {
      uint32_t bits = static_cast<uint32_t>(load<uint16_t>(p + 2 * i)) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
  } else if (dtype == "BF16" || dtype == "I16" || dtype == "I32" || dtype == "I64" || dtype == "F64") {
    for (size_t i = 0; i < count; ++i) {
      if (dtype == "BF16") out[i] = static_cast<float>(load<uint16_t>(p + 2 * i));
      else if (dtype == "I16") out[i] = static_cast<float>(load<int16_t>(p + 2 * i));
      else if (dtype == "I32") out[i] = static_cast<float>(load<int32_t>(p + 4 * i));
      else if (dtype == "I64") out[i] = static_cast<float>(load<int64_t>(p + 8 * i));
      else out[i] = static_cast<float>(load<double>(p + 8 * i));
    }
  } else if (dtype == "I8") {
    for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(static_cast<int8_t>(p[i]));
  } else {  // U8, BOOL
    for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(p[i]);
  }
}

std::string check_name(const Json& name, const std::string& what, const std::string& field, size_t max_bytes) {
  if (!name.is_string()) fail(LOWRA_ERR_BLOB, what + ": " + field + " " + name.brief() + " is not a string");
  if (has_lone_surrogate(name.text))
    fail(LOWRA_ERR_BLOB, what + ": " + field + " " + name.brief() + " is not valid UTF-8 (lone surrogate)");
  if (name.text.empty() || name.text.size() > max_bytes || !is_printable(name.text))
    fail(LOWRA_ERR_BLOB, what + ": " + field + " " + name.brief() + " must be 1.." + std::to_string(max_bytes) +
                             " bytes of printable text");
  return name.text;
}

Header parse_header(const uint8_t* raw, uint64_t file_size, const std::string& what, const Limits& limits) {
  if (file_size < 8)
    fail(LOWRA_ERR_TRUNCATED, what + ": " + std::to_string(file_size) +
                                  " bytes is too short for a safetensors file (needs >= 8)");
  uint64_t n = load<uint64_t>(raw);
  if (n > limits.max_header_bytes)
    fail(LOWRA_ERR_BLOB, what + ": header length " + std::to_string(n) + " exceeds the limit of " +
                             std::to_string(limits.max_header_bytes) + " bytes");
  if (8 + n > file_size)
    fail(LOWRA_ERR_TRUNCATED, what + ": header announces " + std::to_string(n) + " bytes of JSON but the file has only " +
                                  std::to_string(file_size - 8) + " after the length field; the file is truncated");
  std::string_view text(reinterpret_cast<const char*>(raw + 8), n);
  Json root;
  std::string reason;
  if (!valid_utf8(text)) reason = "the header is not valid UTF-8";
  else if (!parse_json(text, root, reason)) {}
  if (!reason.empty())
    fail(LOWRA_ERR_BLOB, what + ": safetensors header is not valid JSON (" + reason.substr(0, 120) +
                             "); the file is corrupted");
  if (!root.is_object())
    fail(LOWRA_ERR_BLOB, what + ": safetensors header must be a JSON object, not " + root.type_name());

  Header header;
  const Json* metadata = nullptr;
  for (const auto& member : root.members)
    if (member.first == "__metadata__") metadata = &member.second;
  if (metadata) {
    if (!metadata->is_object()) fail(LOWRA_ERR_BLOB, what + ": __metadata__ must be an object mapping strings to strings");
    for (const auto& [key, value] : metadata->members) {
      Json key_json;
      key_json.kind = Json::Kind::String;
      key_json.text = key;
      check_name(key_json, what, "metadata key", limits.max_name_bytes);
      if (!value.is_string())
        fail(LOWRA_ERR_BLOB, what + ": metadata " + short_repr(key) + " is " + value.type_name() + ", expected a string");
      if (has_lone_surrogate(value.text))
        fail(LOWRA_ERR_BLOB, what + ": metadata " + short_repr(key) + " is not valid UTF-8 (lone surrogate)");
      header.metadata[key] = value.text;
    }
  }
  uint64_t n_tensors = root.members.size() - (metadata ? 1 : 0);
  if (n_tensors > limits.max_tensors)
    fail(LOWRA_ERR_BLOB, what + ": " + std::to_string(n_tensors) + " tensors exceed the limit of " +
                             std::to_string(limits.max_tensors));
  header.data_offset = 8 + n;
  uint64_t data_size = file_size - header.data_offset;
  if (data_size > limits.max_data_bytes)
    fail(LOWRA_ERR_BLOB, what + ": " + std::to_string(data_size) + " bytes of tensor data exceed the limit of " +
                             std::to_string(limits.max_data_bytes));
  const int64_t max_data = static_cast<int64_t>(std::min<uint64_t>(limits.max_data_bytes, INT64_MAX));
  header.tensors.reserve(n_tensors);
  for (const auto& [name_text, info] : root.members) {
    if (name_text == "__metadata__") continue;
    Json name_json;
    name_json.kind = Json::Kind::String;
    name_json.text = name_text;
    std::string name = check_name(name_json, what, "tensor name", limits.max_name_bytes);
    std::string label = "tensor " + short_repr(name);
    bool keys_ok = info.is_object() && info.members.size() == 3 && info.find("dtype") && info.find("shape") &&
                   info.find("data_offsets");
    if (!keys_ok) fail(LOWRA_ERR_BLOB, what + ": " + label + " entry must have exactly dtype, shape and data_offsets");
    const Json& dtype = *info.find("dtype");
    const Json& shape = *info.find("shape");
    const Json& offsets = *info.find("data_offsets");
    if (!dtype.is_string() || !find_dtype(dtype.text))
      fail(LOWRA_ERR_CONTENT, what + ": " + label + " has dtype " + dtype.brief() + ", expected one of " + known_dtypes());
    if (!shape.is_array() || shape.items.size() > kMaxDims)
      fail(LOWRA_ERR_BLOB, what + ": " + label + " shape must be a list of at most " + std::to_string(kMaxDims) +
                               " integers");
    TensorInfo t;
    t.name = name;
    t.dtype = dtype.text;
    for (const Json& d : shape.items) t.shape.push_back(checked_int(d, 0, kMaxDim, what, label + " dimension"));
    int64_t bound = 1;  // numpy refuses such shapes even when one dimension is 0
    for (int64_t d : t.shape) {
      const int64_t factor = std::max<int64_t>(d, 1);
      if (bound > kMaxDim / factor)  // bound * factor > kMaxDim, asked without overflowing int64
        fail(LOWRA_ERR_BLOB, what + ": " + label + " shape " + list_text(t.shape) + " is larger than any tensor can be");
      bound *= factor;
    }
    if (!offsets.is_array() || offsets.items.size() != 2)
      fail(LOWRA_ERR_BLOB, what + ": " + label + " data_offsets must be [begin, end]");
    int64_t begin = checked_int(offsets.items[0], 0, max_data, what, label + " begin offset");
    int64_t end = checked_int(offsets.items[1], begin, max_data, what, label + " end offset");
    if (static_cast<uint64_t>(end) > data_size)
      fail(LOWRA_ERR_TRUNCATED, what + ": " + label + " ends at byte " + std::to_string(header.data_offset + end) +
                                    " but the file has " + std::to_string(file_size) + " bytes; the file is truncated");
    int64_t expected = t.numel() * static_cast<int64_t>(dtype_size(t.dtype));
    if (end - begin != expected)
      fail(LOWRA_ERR_BLOB, what + ": " + label + " spans " + std::to_string(end - begin) + " bytes but dtype " + t.dtype +
                               " shape " + list_text(t.shape) + " needs " + std::to_string(expected));
    t.start = header.data_offset + begin;
    t.end = header.data_offset + end;
    header.index[name] = header.tensors.size();
    header.tensors.push_back(std::move(t));
  }
  std::vector<const TensorInfo*> order;
  for (const auto& t : header.tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->start != b->start ? a->start < b->start : a->end < b->end;
  });
  uint64_t position = header.data_offset;
  for (const TensorInfo* t : order) {
    if (t->start != position)
      fail(LOWRA_ERR_BLOB, what + ": tensor " + short_repr(t->name) + " starts at byte " + std::to_string(t->start) +
                               " and " + (t->start < position ? "overlaps the previous tensor" : "leaves a gap before it"));
    position = t->end;
  }
  if (position != file_size)
    fail(LOWRA_ERR_BLOB, what + ": tensor data ends at byte " + std::to_string(position) + " but the file has " +
                             std::to_string(file_size) + " bytes; trailing bytes are refused");
  return header;
}

std::vector<ModuleRow> module_entries(const Json& value, const std::string& what, const std::string& fields) {
  if (!value.is_array() || value.items.empty())
    fail(LOWRA_ERR_CONTENT, what + ": metadata 'modules' must be a non-empty list of [" + fields + "]");
  std::vector<ModuleRow> out;
  std::unordered_set<std::string> seen;
  for (const Json& entry : value.items) {
    bool ok = entry.is_array() && entry.items.size() == 4 && entry.items[0].is_string() && entry.items[1].is_int() &&
              entry.items[2].is_int() && entry.items[3].is_int();
    if (!ok)
      fail(LOWRA_ERR_CONTENT, what + ": module entry " + entry.brief() + " is not [" + fields + "] with integer sizes");
    std::string name = check_name(entry.items[0], what, "module name", 512);
    if (!seen.insert(name).second)
      fail(LOWRA_ERR_CONTENT, what + ": module " + short_repr(name, 1 << 20) + " appears twice; each module is listed once");
    auto number = [](const Json& v) { return v.int_overflow ? (v.text[0] == '-' ? INT64_MIN : INT64_MAX) : v.integer; };
    out.push_back({name, number(entry.items[1]), number(entry.items[2]), number(entry.items[3])});
  }
  return out;
}

std::string payload_digest(const Header& header, const uint8_t* data) {
  std::vector<const TensorInfo*> order;
  for (const auto& t : header.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) { return a->name < b->name; });
  Sha256 h;
  for (const TensorInfo* t : order) {
    // np.ascontiguousarray makes a 0-d tensor 1-d, so a scalar hashes with shape [1].
    std::vector<int64_t> shape = t->shape.empty() ? std::vector<int64_t>{1} : t->shape;
    h.update(t->name + "|" + numpy_dtype_str(t->dtype) + "|" + list_text(shape) + "|");
    h.update(data + t->start, t->end - t->start);
  }
  std::string rest = "{";
  for (const auto& [key, value] : header.metadata) {
    if (key == "payload_sha256") continue;
    if (rest.size() > 1) rest += ',';
    append_json_string(rest, key);
    rest += ':';
    append_json_string(rest, value);
  }
  rest += '}';
  h.update(rest);
  return h.hex();
}

void check_envelope(const Header& header, const std::string& what, const std::string& format_name,
                    const std::vector<std::string>& reads, const std::vector<std::string>& required,
                    const std::string& not_this, const std::string& remedy) {
  auto get = [&](const std::string& key) -> const std::string* {
    auto it = header.metadata.find(key);
    return it == header.metadata.end() ? nullptr : &it->second;
  };
  const std::string* format = get("format");
  if (!format || *format != format_name)
    fail(LOWRA_ERR_UNSUPPORTED_FORMAT, what + ": format is " + (format ? short_repr(*format, 1 << 20) : "None") +
                                           ", expected '" + format_name + "'; " + not_this);
  const std::string* version = get("format_version");
  // Exactly as written ("1", not " 1", "01" or "+1").
  if (!version || std::find(reads.begin(), reads.end(), *version) == reads.end()) {
    std::string known;
    for (size_t i = 0; i < reads.size(); ++i) known += (i ? ", " : "") + reads[i];
    fail(LOWRA_ERR_UNSUPPORTED_FORMAT, what + ": format version " + (version ? short_repr(*version, 1 << 20) : "None") +
                                           " is not supported; this runtime reads versions [" + known +
                                           "]. Upgrade lowra on the device or " + remedy);
  }
  std::string missing;
  for (const auto& key : required)
    if (!get(key)) missing += (missing.empty() ? "'" : ", '") + key + "'";
  if (!missing.empty()) fail(LOWRA_ERR_CONTENT, what + ": metadata lacks required keys [" + missing + "]");
}

void verify_payload(const Header& header, const uint8_t* data, const std::string& what, const std::string& remedy) {
  std::string digest = payload_digest(header, data);
  const std::string& stored = header.metadata.at("payload_sha256");
  if (digest != stored)
    fail(LOWRA_ERR_CHECKSUM, what + ": payload sha256 is " + digest.substr(0, 16) + "..., the file says " +
                                 short_repr(stored.substr(0, 16), 40) + "...; the file is corrupted or was modified "
                                 "after writing. " + remedy);
}

Json decode_json_metadata(const Header& header, const std::string& key, const std::string& what) {
  Json value;
  std::string reason;
  if (!parse_json(header.metadata.at(key), value, reason))
    fail(LOWRA_ERR_CONTENT, what + ": metadata '" + key + "' is not valid JSON (" + reason.substr(0, 120) + ")");
  // One spelling per value, what lowra's writer makes: another spelling of the same value is refused, not normalized.
  if (canonical_json(value) != header.metadata.at(key))
    fail(LOWRA_ERR_CONTENT, what + ": metadata '" + key + "' is not in canonical JSON form (compact, sorted keys)");
  return value;
}

}  // namespace lowra
