#include "quantized_base.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>

#include "adapter.hpp"
#include "container.hpp"
#include "error.hpp"
#include "json.hpp"
#include "sha256.hpp"
#include "unicode.hpp"

namespace lowra {
namespace {

// quantized_base.LIMITS: SmolLM2's base has ~950 tensors and a ~150 KB header.
const Limits kBaseLimits{16ull << 20, 200000, 1ull << 40, 1024};
constexpr int64_t kMaxFeatures = int64_t{1} << 20;
constexpr const char* kLayerTensors[] = {"codebooks", "codes", "scales", "widths"};  // sorted, as the fingerprint hashes
constexpr const char* kLevelTensors[] = {"levels", "level_exponents"};  // version 4, instead of "codebooks"
constexpr uint8_t kWidthOfCode[4] = {0, 1, 2, 4};
// formats.int_levels: levels k * 2**e, one e per row; k has LEVEL_BITS[w] bits by the row's width w (6 for 1- and
// 2-bit rows: k in -31..31, e in -24..11; 8 for 4-bit rows: k in -127..127, e in -24..9).
constexpr int kMinExponent = -24;
constexpr int level_bits(uint8_t width) { return width == 4 ? 8 : 6; }                    // LEVEL_BITS[width]
constexpr int level_limit(uint8_t width) { return (1 << (level_bits(width) - 1)) - 1; }  // 31 or 127
constexpr int max_exponent(uint8_t width) { return level_bits(width) == 6 ? 11 : 9; }    // 31 * 2**11, 127 * 2**9

struct Layer {
  std::string name;
  int64_t out, in, group;
  std::vector<uint8_t> widths;  // decoded, one per row
  const TensorInfo* tensor[4];  // codebooks (nullptr in version 4), codes, scales, widths
  const TensorInfo* levels[2] = {nullptr, nullptr};  // version 4: levels, level_exponents
  std::vector<uint16_t> decoded;  // version 4: the float16 codebooks (bits) expanded from them
  int64_t n_groups() const { return group == 0 ? 0 : (in + group - 1) / group; }
  bool int_levels() const { return tensor[0] == nullptr; }
  // The float16 codebooks, rows concatenated, as a version-1 file stores them (little-endian, as every host is).
  const uint8_t* codebooks(const uint8_t* data) const {
    return int_levels() ? reinterpret_cast<const uint8_t*>(decoded.data()) : data + tensor[0]->start;
  }
  int64_t n_levels() const { return int_levels() ? static_cast<int64_t>(decoded.size()) : tensor[0]->numel(); }
};

const char* numpy_name(const std::string& dtype) {
  static const std::map<std::string, const char*> names = {
      {"F64", "float64"}, {"F32", "float32"}, {"F16", "float16"}, {"I64", "int64"}, {"I32", "int32"},
      {"I16", "int16"},   {"I8", "int8"},     {"U8", "uint8"},    {"BOOL", "bool"}, {"BF16", "uint16"}};
  return names.at(dtype);
}

bool is_numpy_float(const std::string& dtype) { return dtype == "F16" || dtype == "F32" || dtype == "F64"; }

// np.isfinite over the stored values (a float64 is checked as float64: a finite one may overflow float32).
bool all_finite(const std::string& dtype, const uint8_t* data, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    double value;
    if (dtype == "F64") {
      std::memcpy(&value, data + 8 * i, 8);
    } else {
      float f;
      to_float32(dtype, data + (dtype == "F32" ? 4 : 2) * i, 1, &f, false);
      value = f;
    }
    if (!std::isfinite(value)) return false;
  }
  return true;
}

std::string last_component(const std::string& name) {
  size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

std::string module_of(const std::string& name) {
  size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// int_levels.decode_levels (version 4): the layer's levels and level_exponents -> its float16 codebooks (bits), with
// its refusals in its order: dtypes and sizes, each row's exponent in its width's range, zero padding bits, each level
// within its row's limit (no -32 in a 6-bit row, no -128 in an 8-bit one), ascending within each row. The levels are
// one LSB-first bit stream, rows in order, each level on its row's bits. Each k * 2**e (|k| <= 127, e in its row's
// range) is a finite float16 exactly, so float_to_half never rounds here.
std::vector<uint16_t> decode_levels(const Layer& layer, const uint8_t* data, const std::string& where) {
  const TensorInfo& levels = *layer.levels[0];
  const TensorInfo& exponents = *layer.levels[1];
  int64_t n_levels = 0, used_bits = 0;
  for (uint8_t w : layer.widths) n_levels += int64_t{1} << w, used_bits += int64_t{level_bits(w)} << w;
  const int64_t want = (used_bits + 7) / 8;  // packed_level_bytes
  if (levels.dtype != "U8" || levels.shape != std::vector<int64_t>{want})
    fail(LOWRA_ERR_CONTENT, where + ": levels is " + numpy_name(levels.dtype) + " " + shape_text(levels.shape) +
                                ", expected uint8 [" + std::to_string(want) + "] (" + std::to_string(n_levels) +
                                " levels of 6 or 8 bits)");
  if (exponents.dtype != "I8" || exponents.shape != std::vector<int64_t>{layer.out})
    fail(LOWRA_ERR_CONTENT, where + ": level_exponents is " + numpy_name(exponents.dtype) + " " +
                                shape_text(exponents.shape) + ", expected int8 [" + std::to_string(layer.out) +
                                "] (one per row)");
  const int8_t* e = reinterpret_cast<const int8_t*>(data + exponents.start);
  for (int64_t r = 0; r < layer.out; ++r)
    if (e[r] < kMinExponent || e[r] > max_exponent(layer.widths[r]))
      fail(LOWRA_ERR_CONTENT, where + ": row " + std::to_string(r) + "'s level exponent is " + std::to_string(e[r]) +
                                  ", expected " + std::to_string(kMinExponent) + ".." +
                                  std::to_string(max_exponent(layer.widths[r])) + " for a " +
                                  std::to_string(layer.widths[r]) + "-bit row");
  const uint8_t* stream = data + levels.start;
  if (used_bits % 8 && (stream[want - 1] >> (used_bits % 8)) != 0)  // only the last byte holds padding
    fail(LOWRA_ERR_CONTENT, where + ": levels has nonzero padding bits after its " + std::to_string(n_levels) +
                                " levels");
  std::vector<int8_t> k(static_cast<size_t>(n_levels));  // 6- or 8-bit two's complement, sign-extended
  int64_t bit = 0, level = 0;
  for (uint8_t w : layer.widths) {
    const int bits = level_bits(w);
    for (int64_t j = 0; j < (int64_t{1} << w); ++j, ++level, bit += bits) {  // stream bits bit .. bit + bits - 1
      unsigned value = stream[bit >> 3] >> (bit & 7);
      if ((bit & 7) + bits > 8) value |= static_cast<unsigned>(stream[(bit >> 3) + 1]) << (8 - (bit & 7));
      value &= (1u << bits) - 1;
      k[level] = static_cast<int8_t>(value >= (1u << (bits - 1)) ? static_cast<int>(value) - (1 << bits)
                                                                  : static_cast<int>(value));
    }
  }
  level = 0;
  for (int64_t r = 0; r < layer.out; ++r) {  // the first level below its row's limit, in stream order
    const int limit = level_limit(layer.widths[r]);
    for (int64_t j = 0; j < (int64_t{1} << layer.widths[r]); ++j, ++level)
      if (k[level] < -limit)
        fail(LOWRA_ERR_CONTENT, where + ": row " + std::to_string(r) + " has the level " + std::to_string(k[level]) +
                                    ", expected integers in -" + std::to_string(limit) + ".." + std::to_string(limit));
  }
  int64_t offset = 0;
  for (uint8_t w : layer.widths) {
    for (int64_t i = offset + 1; i < offset + (int64_t{1} << w); ++i)
      if (k[i] < k[i - 1]) fail(LOWRA_ERR_CONTENT, where + ": a row's codebook levels are not in ascending order");
    offset += int64_t{1} << w;
  }
  std::vector<uint16_t> books(static_cast<size_t>(n_levels));
  offset = 0;
  for (int64_t r = 0; r < layer.out; ++r) {
    const int64_t count = int64_t{1} << layer.widths[r];
    for (int64_t i = offset; i < offset + count; ++i)  // k = 0 is +0.0, as numpy's 0 * 2.0**e
      books[i] = float_to_half(std::ldexp(static_cast<float>(k[i]), e[r]));
    offset += count;
  }
  return books;
}

// QuantizedWeight.validate, after the widths were decoded (and, in version 4, the codebooks: float16 of the size the
// widths imply by construction, so only their values are checked).
void validate_layer(const Layer& layer, const uint8_t* data, const std::string& where) {
  const TensorInfo* codebooks = layer.tensor[0];
  const TensorInfo& codes = *layer.tensor[1];
  const TensorInfo& scales = *layer.tensor[2];
  std::vector<int64_t> scale_shape = {layer.out, layer.n_groups()};
  struct Check {
    const TensorInfo* info;
    const char* field;
    const char* dtype;
    const std::vector<int64_t>* shape;
  };
  for (const Check& c : {Check{&codes, "codes", "U8", nullptr}, Check{codebooks, "codebooks", "F16", nullptr},
                         Check{&scales, "scales", "F16", &scale_shape}}) {
    if (c.info && (c.info->dtype != c.dtype || (c.shape && c.info->shape != *c.shape)))
      fail(LOWRA_ERR_CONTENT, where + ": " + c.field + " is " + numpy_name(c.info->dtype) + " " +
                                  shape_text(c.info->shape) + ", expected " + numpy_name(c.dtype) + " " +
                                  (c.shape ? shape_text(*c.shape) : "1-D"));
  }
  int64_t code_bytes = 0, levels = 0;
  for (uint8_t w : layer.widths) code_bytes += (layer.in * w + 7) / 8, levels += int64_t{1} << w;
  for (const auto& [info, field, expected] : {std::make_tuple(&codes, "codes", code_bytes),
                                              std::make_tuple(codebooks, "codebooks", levels)}) {
    if (info && info->shape != std::vector<int64_t>{expected})
      fail(LOWRA_ERR_CONTENT, where + ": " + field + " has " + std::to_string(info->numel()) + " entries, widths imply " +
                                  std::to_string(expected));
  }
  std::vector<float> values(layer.n_levels()), scale_values(scales.numel());
  to_float32("F16", layer.codebooks(data), values.size(), values.data(), true);
  to_float32("F16", data + scales.start, scale_values.size(), scale_values.data(), true);
  bool finite = std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); }) &&
                std::all_of(scale_values.begin(), scale_values.end(), [](float v) { return std::isfinite(v); });
  if (!finite) fail(LOWRA_ERR_CONTENT, where + ": codebooks or scales contain NaN or Inf");
  int64_t offset = 0;
  for (uint8_t w : layer.widths) {
    for (int64_t i = offset + 1; i < offset + (int64_t{1} << w); ++i)
      if (values[i] < values[i - 1]) fail(LOWRA_ERR_CONTENT, where + ": a row's codebook levels are not in ascending order");
    offset += int64_t{1} << w;
  }
}

// A version-2 base's accuracy-recovery adapter (docs/FORMAT.md "Version 2"): per module, float16 A [rank, in] and
// B [out, rank]; the layer's weight is float32(decode + scaling * sum_k B[:, k] A[k, :]).
struct Recovery {
  int64_t rank = 0;
  double scaling = 0;
  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> factors;  // version 2: (lora_A, lora_B)
  const TensorInfo* blob = nullptr;                                             // version 3: recovery.blob
  std::map<std::string, Factors> decoded;  // version 3: each module's factors, decoded from the blob
  bool has(const std::string& module) const { return blob ? decoded.count(module) != 0 : factors.count(module) != 0; }
};

constexpr const char* kRecoveryKey = "recovery";
constexpr const char* kRecoveryPrefix = "recovery.";
constexpr const char* kRecoveryBlob = "recovery.blob";
constexpr int64_t kMaxRecoveryRank = 1024;

// quantized_fingerprint: the modules sorted by name, each its line and its four tensors as a version-1 file stores
// them (widths re-encoded from the decoded widths, so padding bits do not count; a version-4 layer's codebooks as the
// float16 decoded from its integer levels, under the name M.codebooks); with a recovery adapter, its line and its
// tensors sorted by name.
std::string quantized_fingerprint(std::vector<const Layer*> layers, const uint8_t* data, const Recovery* recovery) {
  std::sort(layers.begin(), layers.end(), [](const Layer* a, const Layer* b) { return a->name < b->name; });
  Sha256 h;
  for (const Layer* layer : layers) {
    h.update(layer->name + "|[" + std::to_string(layer->out) + ", " + std::to_string(layer->in) + "]|" +
             std::to_string(layer->group) + "\n");
    for (int t = 0; t < 4; ++t) {
      std::string name = layer->name + "." + kLayerTensors[t];
      if (t == 0) {  // validated as float16 [levels the widths imply]
        const int64_t n = layer->n_levels();
        h.update(name + "|" + numpy_dtype_str("F16") + "|" + shape_text({n}) + "|");
        h.update(layer->codebooks(data), static_cast<size_t>(2 * n));
      } else if (t == 3) {
        std::vector<uint8_t> packed((layer->out + 3) / 4, 0);
        for (int64_t r = 0; r < layer->out; ++r) {
          uint8_t code = layer->widths[r] == 4 ? 3 : layer->widths[r];
          packed[r >> 2] |= static_cast<uint8_t>(code << (2 * (r & 3)));
        }
        h.update(name + "|" + numpy_dtype_str("U8") + "|[" + std::to_string(packed.size()) + "]|");
        h.update(packed.data(), packed.size());
      } else {
        const TensorInfo& info = *layer->tensor[t];
        h.update(name + "|" + numpy_dtype_str(info.dtype) + "|" + shape_text(info.shape) + "|");
        h.update(data + info.start, info.end - info.start);
      }
    }
  }
  if (recovery != nullptr) {
    std::string line = "recovery|" + std::to_string(recovery->rank) + "|";
    append_python_float(line, recovery->scaling);
    h.update(line + "\n");
    std::map<std::string, const TensorInfo*> sorted;
    if (recovery->blob) sorted[recovery->blob->name] = recovery->blob;
    for (const auto& [module, pair] : recovery->factors) {
      sorted[pair.first->name] = pair.first;
      sorted[pair.second->name] = pair.second;
    }
    for (const auto& [name, info] : sorted) {
      h.update(name + "|" + numpy_dtype_str(info->dtype) + "|" + shape_text(info->shape) + "|");
      h.update(data + info->start, info->end - info->start);
    }
  }
  return "sha256:" + h.hex();
}

// formats.quantized_base._read_recovery_blob (version 3, or version 4 with recovery.blob): recovery.blob read as an adapter blob (parse_blob's
// checks), one rank, the metadata's modules, rank and scaling 1.0, then _check_recovery's checks.
Recovery read_recovery_blob(const Json& value, const Header& header, const std::map<std::string, size_t>& layer_index,
                            const std::vector<Layer>& layers, const uint8_t* data, const std::string& what) {
  const TensorInfo* raw = header.find(kRecoveryBlob);
  if (!raw) fail(LOWRA_ERR_CONTENT, what + ": a compressed recovery adapter (version 3) needs " + kRecoveryBlob);
  if (raw->dtype != "U8" || raw->shape.size() != 1)
    fail(LOWRA_ERR_CONTENT, what + ": " + kRecoveryBlob + " is " + numpy_name(raw->dtype) + " " +
                                shape_text(raw->shape) + ", expected uint8 [bytes]");
  const std::string where = what + ": recovery adapter";
  Blob blob = parse_blob(data + raw->start, static_cast<size_t>(raw->end - raw->start), where);
  std::set<int64_t> ranks;
  for (const AdapterModule& m : blob.modules) ranks.insert(m.rank);
  if (ranks.size() != 1)
    fail(LOWRA_ERR_CONTENT, where + ": its modules have " + std::to_string(ranks.size()) + " ranks; a recovery "
                                    "adapter has one rank");
  const Json& modules = *value.find("modules");
  std::set<std::string> named, stored;
  for (const Json& m : modules.items) named.insert(m.text);
  for (const AdapterModule& m : blob.modules) stored.insert(m.name);
  if (named != stored || stored.size() != blob.modules.size())
    fail(LOWRA_ERR_CONTENT, where + ": the blob's modules are not the " + std::to_string(modules.items.size()) +
                                " the metadata names");
  Recovery recovery;
  recovery.blob = raw;
  recovery.rank = *ranks.begin();
  const Json& rank = *value.find("rank");
  if (!rank.is_int() || rank.int_overflow || rank.integer != recovery.rank)
    fail(LOWRA_ERR_CONTENT, where + ": rank " + rank.brief() + " in the metadata, " + std::to_string(recovery.rank) +
                                " in the blob");
  const Json& scaling = *value.find("scaling");
  const bool one = (scaling.is_int() && !scaling.int_overflow && scaling.integer == 1) ||
                   (scaling.kind == Json::Kind::Float && scaling.number == 1.0);
  if (!one) fail(LOWRA_ERR_CONTENT, where + ": scaling " + scaling.brief() + "; a compressed adapter folds it in (1.0)");
  recovery.scaling = 1.0;
  if (recovery.rank < 1 || recovery.rank > kMaxRecoveryRank)  // _check_recovery
    fail(LOWRA_ERR_CONTENT, where + ": rank " + std::to_string(recovery.rank) + " is not an integer in 1.." +
                                std::to_string(kMaxRecoveryRank));
  for (size_t i = 0; i < blob.modules.size(); ++i) {
    const AdapterModule& m = blob.modules[i];
    auto it = layer_index.find(m.name);
    if (it == layer_index.end())
      fail(LOWRA_ERR_CONTENT, where + ": module " + short_repr(m.name, 1 << 20) + " is not a quantized layer of this base");
    const Layer& layer = layers[it->second];
    if (m.in_features != layer.in)
      fail(LOWRA_ERR_CONTENT, where + ": " + kRecoveryPrefix + m.name + ".lora_A is float16 [" +
                                  std::to_string(recovery.rank) + ", " + std::to_string(m.in_features) +
                                  "], expected float16 [" + std::to_string(recovery.rank) + ", " +
                                  std::to_string(layer.in) + "]");
    if (m.out_features != layer.out)
      fail(LOWRA_ERR_CONTENT, where + ": " + kRecoveryPrefix + m.name + ".lora_B is float16 [" +
                                  std::to_string(m.out_features) + ", " + std::to_string(recovery.rank) +
                                  "], expected float16 [" + std::to_string(layer.out) + ", " +
                                  std::to_string(recovery.rank) + "]");
    recovery.decoded[m.name] = decode_factors(blob, i);
  }
  return recovery;
}

// formats.quantized_base._read_recovery then _check_recovery, in their order and with their refusals.
Recovery read_recovery(const Json& value, const Header& header, const std::map<std::string, size_t>& layer_index,
                       const std::vector<Layer>& layers, const uint8_t* data, const std::string& what,
                       bool compressed) {
  const Json* rank = value.is_object() ? value.find("rank") : nullptr;
  const Json* scaling = value.is_object() ? value.find("scaling") : nullptr;
  const Json* modules = value.is_object() ? value.find("modules") : nullptr;
  if (!rank || !scaling || !modules)
    fail(LOWRA_ERR_CONTENT, what + ": the recovery metadata must be an object with rank, scaling and modules");
  std::map<std::string, bool> seen;
  bool distinct = modules->is_array();
  if (distinct)
    for (const Json& m : modules->items) distinct = distinct && m.is_string() && seen.emplace(m.text, true).second;
  if (!distinct) fail(LOWRA_ERR_CONTENT, what + ": recovery modules must be a list of distinct module names");
  if (compressed) return read_recovery_blob(value, header, layer_index, layers, data, what);
  Recovery recovery;
  for (const Json& m : modules->items) {
    const TensorInfo* pair[2];
    int t = 0;
    for (const char* tname : {"lora_A", "lora_B"}) {
      const std::string key = kRecoveryPrefix + m.text + "." + tname;
      const TensorInfo* info = header.find(key);
      if (!info) fail(LOWRA_ERR_CONTENT, what + ": the recovery adapter names module " + short_repr(m.text, 1 << 20) +
                                             " but lacks " + key);
      if (info->dtype != "F16")
        fail(LOWRA_ERR_CONTENT, what + ": " + key + " is " + numpy_name(info->dtype) + ", expected float16");
      pair[t++] = info;
    }
    recovery.factors[m.text] = {pair[0], pair[1]};
  }
  const std::string where = what + ": recovery adapter";
  if (!rank->int_in(1, kMaxRecoveryRank))
    fail(LOWRA_ERR_CONTENT, where + ": rank " + rank->brief() + " is not an integer in 1.." +
                                std::to_string(kMaxRecoveryRank));
  recovery.rank = rank->integer;
  const bool number = (scaling->is_int() && !scaling->int_overflow) || scaling->kind == Json::Kind::Float;
  recovery.scaling = scaling->is_int() ? static_cast<double>(scaling->integer) : scaling->number;
  if (!number || !std::isfinite(recovery.scaling) || !(recovery.scaling > 0))
    fail(LOWRA_ERR_CONTENT, where + ": scaling " + scaling->brief() + " is not a finite number > 0");
  if (recovery.factors.empty())
    fail(LOWRA_ERR_CONTENT, where + ": names no module; a recovery adapter covers at least one quantized layer");
  for (const Json& m : modules->items) {  // in the metadata's order, as Python iterates its dict
    auto it = layer_index.find(m.text);
    if (it == layer_index.end())
      fail(LOWRA_ERR_CONTENT, where + ": module " + short_repr(m.text, 1 << 20) + " is not a quantized layer of this base");
    const Layer& layer = layers[it->second];
    const auto& [a, b] = recovery.factors.at(m.text);
    const std::pair<const TensorInfo*, std::vector<int64_t>> wants[2] = {{a, {recovery.rank, layer.in}},
                                                                         {b, {layer.out, recovery.rank}}};
    for (const auto& [info, want] : wants) {
      if (info->shape != want)
        fail(LOWRA_ERR_CONTENT, where + ": " + info->name + " is float16 " + shape_text(info->shape) +
                                    ", expected float16 " + shape_text(want));
      if (!all_finite(info->dtype, data + info->start, info->numel()))
        fail(LOWRA_ERR_CONTENT, where + ": " + info->name + " contains NaN or Inf (as float16)");
    }
  }
  return recovery;
}

// recovered_weight: float32(decode + scaling * acc), acc = sum over k ascending of B[:, k] * A[k, :] in float64
// (each product of two float16 values is exact; no fused multiply-add: built with -ffp-contract=off).
// Version 3: A = down, B = up of the decoded blob, its dropped components left out (each would add an exact 0.0).
void apply_recovery(std::vector<float>& weight, const Layer& layer, const Recovery& recovery, const uint8_t* data) {
  const int64_t in = layer.in;
  int64_t rank = recovery.rank;
  std::vector<float> a, b;
  if (recovery.blob) {
    const Factors& f = recovery.decoded.at(layer.name);
    rank = f.kept;
    a = f.down;
    b = f.up;
  } else {
    const auto& [a_info, b_info] = recovery.factors.at(layer.name);
    a.resize(a_info->numel());
    b.resize(b_info->numel());
    to_float32("F16", data + a_info->start, a.size(), a.data(), true);
    to_float32("F16", data + b_info->start, b.size(), b.data(), true);
  }
  std::vector<double> acc(static_cast<size_t>(in));
  for (int64_t r = 0; r < layer.out; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = 0; k < rank; ++k) {
      const double bk = b[r * rank + k];
      const float* a_row = a.data() + k * in;
      for (int64_t c = 0; c < in; ++c) acc[c] += bk * static_cast<double>(a_row[c]);
    }
    float* row = weight.data() + r * in;
    for (int64_t c = 0; c < in; ++c) {
      const double scaled = recovery.scaling * acc[c];
      row[c] = static_cast<float>(static_cast<double>(row[c]) + scaled);
    }
  }
}

// QuantizedWeight.dequantize: W[r, j] = codebook_r[code[r, j]] * scale[r, j // group_size] in float32.
std::vector<float> dequantize(const Layer& layer, const uint8_t* data) {
  const uint8_t* codes = data + layer.tensor[1]->start;
  const TensorInfo& scales = *layer.tensor[2];
  std::vector<float> levels(layer.n_levels()), scale(scales.numel());
  to_float32("F16", layer.codebooks(data), levels.size(), levels.data(), true);
  to_float32("F16", data + scales.start, scale.size(), scale.data(), true);
  std::vector<float> out(layer.out * layer.in);
  int64_t code_offset = 0, level_offset = 0, groups = layer.n_groups();
  for (int64_t r = 0; r < layer.out; ++r) {
    int w = layer.widths[r];
    const uint8_t* row = codes + code_offset;
    const float* book = levels.data() + level_offset;
    float* dst = out.data() + r * layer.in;
    for (int64_t j = 0; j < layer.in; ++j) {
      int64_t bit = j * w;
      dst[j] = book[(row[bit >> 3] >> (bit & 7)) & ((1u << w) - 1)];
    }
    if (layer.group)
      for (int64_t j = 0; j < layer.in; ++j) dst[j] *= scale[r * groups + j / layer.group];
    code_offset += (layer.in * w + 7) / 8;
    level_offset += int64_t{1} << w;
  }
  return out;
}

}  // namespace

BaseIdentity read_quantized_base(const uint8_t* data, uint64_t size, const std::string& what, TensorTable& out) {
  Header header = parse_header(data, size, what, kBaseLimits);
  check_envelope(header, what, "lowra-base", {"1", "2", "3", "4"},
                 {"format", "format_version", "modules", "group_size", "aliases", "source", "scheme", "report",
                  "fingerprint", "payload_sha256", "created"},
                 "this is not a lowra quantized base (an adapter blob says 'lowra-adapter'; a plain model folder is "
                 "loaded with DeviceRuntime)",
                 "re-quantize the base");
  verify_payload(header, data, what, "Copy it again or re-quantize the base");
  Json modules_json, aliases_json;
  for (const char* key : {"modules", "aliases", "scheme", "report"}) {
    Json value = decode_json_metadata(header, key, what);
    if (std::string(key) == "modules") modules_json = std::move(value);
    if (std::string(key) == "aliases") aliases_json = std::move(value);
  }
  std::vector<ModuleRow> table = module_entries(modules_json, what, "name, out, in, group_size");
  for (const ModuleRow& m : table)
    if (!(m.a >= 1 && m.a <= kMaxFeatures && m.b >= 1 && m.b <= kMaxFeatures && m.c >= 0 && m.c <= kMaxFeatures))
      fail(LOWRA_ERR_CONTENT, what + ": module " + short_repr(m.name, 1 << 20) + " shape [" + std::to_string(m.a) + ", " +
                                  std::to_string(m.b) + "] / group " + std::to_string(m.c) + " outside 1.." +
                                  std::to_string(kMaxFeatures));
  const std::string& version = header.metadata.at("format_version");
  const bool int_levels = version == "4";  // codebooks stored as integer levels (formats.int_levels)
  // The layer tensors this version stores, in Python's order, and the other layout's, which it refuses.
  std::vector<std::string> stored_tensors = {"codes", "scales", "widths", "levels", "level_exponents"};
  std::vector<std::string> other_tensors = {"codebooks"};
  if (!int_levels) {
    stored_tensors.assign(std::begin(kLayerTensors), std::end(kLayerTensors));
    other_tensors.assign(std::begin(kLevelTensors), std::end(kLevelTensors));
  }
  std::vector<Layer> layers;
  layers.reserve(table.size());
  std::map<std::string, size_t> layer_index;
  std::map<std::string, bool> layer_tensor_names;
  for (const ModuleRow& m : table) {
    Layer layer{m.name, m.a, m.b, m.c, {}, {}, {}, {}};
    std::string absent, foreign;
    for (const std::string& t : stored_tensors) {
      const std::string name = m.name + "." + t;
      if (!header.find(name)) absent += (absent.empty() ? "" : ", ") + short_repr(name, 1 << 20);
    }
    if (!absent.empty()) fail(LOWRA_ERR_CONTENT, what + ": module " + short_repr(m.name, 1 << 20) + " lacks tensors [" + absent + "]");
    for (const std::string& t : other_tensors) {
      const std::string name = m.name + "." + t;
      if (header.find(name)) foreign += (foreign.empty() ? "" : ", ") + short_repr(name, 1 << 20);
    }
    if (!foreign.empty())
      fail(LOWRA_ERR_CONTENT, what + ": a version-" + version + " base stores codebooks as " +
                                  (int_levels ? "integer levels" : "float16") + ", but module " + short_repr(m.name, 1 << 20) +
                                  " also has [" + foreign + "]");
    for (int t = 0; t < 4; ++t) layer.tensor[t] = header.find(m.name + "." + kLayerTensors[t]);  // codebooks: v1-3
    for (int t = 0; t < 2; ++t) layer.levels[t] = header.find(m.name + "." + kLevelTensors[t]);  // version 4
    const TensorInfo& packed = *layer.tensor[3];
    int64_t width_bytes = (m.a + 3) / 4;
    if (packed.dtype != "U8" || packed.shape != std::vector<int64_t>{width_bytes})
      fail(LOWRA_ERR_CONTENT, what + ": " + packed.name + " is " + numpy_name(packed.dtype) + " " + shape_text(packed.shape) +
                                  ", expected uint8 [" + std::to_string(width_bytes) + "] (2-bit width codes for " +
                                  std::to_string(m.a) + " rows)");
    const uint8_t* bits = data + packed.start;
    for (int64_t r = 0; r < m.a; ++r) layer.widths.push_back(kWidthOfCode[(bits[r >> 2] >> (2 * (r & 3))) & 3]);
    if (std::find(layer.widths.begin(), layer.widths.end(), 0) != layer.widths.end())
      fail(LOWRA_ERR_CONTENT, what + ": module " + short_repr(m.name, 1 << 20) +
                                  " has rows of width 0; every base row needs 1, 2 or 4 bits");
    if (int_levels) layer.decoded = decode_levels(layer, data, what + ": module " + short_repr(m.name, 1 << 20));
    validate_layer(layer, data, what + ": module " + short_repr(m.name, 1 << 20));
    for (const std::string& t : stored_tensors) layer_tensor_names[m.name + "." + t] = true;
    layer_index[m.name] = layers.size();
    layers.push_back(std::move(layer));
  }
  std::unique_ptr<Recovery> recovery;
  const bool has_recovery_key = header.metadata.count(kRecoveryKey) != 0;
  const bool has_recovery_tensor = std::any_of(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& t) {
    return t.name.rfind(kRecoveryPrefix, 0) == 0;
  });
  // Version 4 may carry an adapter of either kind: compressed when recovery.blob is there.
  if (version == "2" || version == "3" || (int_levels && (has_recovery_key || has_recovery_tensor))) {
    if (!has_recovery_key)
      fail(LOWRA_ERR_CONTENT, what + ": a version-" + version + " base needs the '" + kRecoveryKey + "' metadata");
    const bool compressed = version == "3" || (int_levels && header.find(kRecoveryBlob));
    recovery = std::make_unique<Recovery>(read_recovery(decode_json_metadata(header, kRecoveryKey, what), header,
                                                        layer_index, layers, data, what, compressed));
    std::vector<std::string> stray;
    for (const auto& t : header.tensors) {
      if (t.name.rfind(kRecoveryPrefix, 0) != 0) continue;
      layer_tensor_names[t.name] = true;
      const std::string rest = t.name.substr(std::string(kRecoveryPrefix).size());
      const size_t dot = rest.rfind('.');
      const std::string module = dot == std::string::npos ? "" : rest.substr(0, dot);
      const std::string tname = dot == std::string::npos ? "" : rest.substr(dot + 1);
      const bool named = recovery->blob ? t.name == kRecoveryBlob
                                        : recovery->factors.count(module) && (tname == "lora_A" || tname == "lora_B");
      if (!named) stray.push_back(t.name);
    }
    if (!stray.empty())
      fail(LOWRA_ERR_CONTENT, what + ": recovery tensors ['" + stray[0] + "'" + (stray.size() > 1 ? ", ..." : "") +
                                  "] belong to no module the metadata names");
  } else if (has_recovery_key || has_recovery_tensor) {
    fail(LOWRA_ERR_CONTENT, what + ": a version-" + version + " base carries recovery data; only versions 2, 3 and 4 "
                                   "may (re-run `lowra recover`)");
  }
  std::vector<const TensorInfo*> dense;
  for (const auto& t : header.tensors)
    if (!layer_tensor_names.count(t.name)) dense.push_back(&t);
  std::vector<const Layer*> layer_ptrs;
  for (const auto& l : layers) layer_ptrs.push_back(&l);
  std::string fingerprint = quantized_fingerprint(layer_ptrs, data, recovery.get());
  const std::string& stored = header.metadata.at("fingerprint");
  if (fingerprint != stored)
    fail(LOWRA_ERR_CHECKSUM, what + ": the quantized layers hash to " + fingerprint.substr(0, 23) + "..., the file says " +
                                 short_repr(stored.substr(0, 23), 40) + "...; the file is corrupted or was modified. "
                                 "Re-quantize the base");
  std::map<std::string, const TensorInfo*> dense_by_name;
  for (const TensorInfo* t : dense) {  // _check_dense
    if (ends_with(t->name, ".weight") && layer_index.count(module_of(t->name)))
      fail(LOWRA_ERR_CONTENT, what + ": dense tensor " + short_repr(t->name, 1 << 20) +
                                  " would shadow the quantized layer " + short_repr(module_of(t->name), 1 << 20));
    if (is_numpy_float(t->dtype) && !all_finite(t->dtype, data + t->start, t->numel()))
      fail(LOWRA_ERR_CONTENT, what + ": dense tensor " + short_repr(t->name, 1 << 20) + " contains NaN or Inf");
    dense_by_name[t->name] = t;
  }
  if (!aliases_json.is_object())  // _alias_table
    fail(LOWRA_ERR_CONTENT, what + ": aliases must be an object mapping names to stored dense tensors");
  for (const auto& [alias, target] : aliases_json.members) {
    Json alias_json;
    alias_json.kind = Json::Kind::String;
    alias_json.text = alias;
    check_name(alias_json, what, "alias", 512);
    if (!target.is_string() || !dense_by_name.count(target.text))
      fail(LOWRA_ERR_CONTENT, what + ": alias " + short_repr(alias) + " -> " + target.brief() +
                                  ": the target is not a stored dense tensor");
    if (dense_by_name.count(alias) || (ends_with(alias, ".weight") && layer_index.count(module_of(alias))))
      fail(LOWRA_ERR_CONTENT, what + ": alias " + short_repr(alias, 1 << 20) + " names a tensor the file stores itself");
    if (last_component(alias) != last_component(target.text))
      fail(LOWRA_ERR_CONTENT, what + ": alias " + short_repr(alias, 1 << 20) + " -> " + short_repr(target.text, 1 << 20) +
                                  " ties tensors of different kinds");
  }
  // dequantized_state_dict: layers as "<module>.weight", dense tensors widened, aliases sharing their target.
  for (const Layer& layer : layers) {
    Tensor t;
    t.shape = {layer.out, layer.in};
    std::vector<float> weight = dequantize(layer, data);
    if (recovery && recovery->has(layer.name)) apply_recovery(weight, layer, *recovery, data);
    t.values = std::make_shared<const std::vector<float>>(std::move(weight));
    out.add(layer.name + ".weight", std::move(t));
  }
  for (const TensorInfo* info : dense) {
    Tensor t;
    t.shape = info->shape;
    t.floating = is_numpy_float(info->dtype);
    auto values = std::make_shared<std::vector<float>>(info->numel());
    to_float32(info->dtype, data + info->start, values->size(), values->data(), false);
    t.values = std::move(values);
    out.add(info->name, std::move(t));
  }
  for (const auto& [alias, target] : aliases_json.members) out.add(alias, *out.find(target.text));
  return BaseIdentity{header.metadata.at("payload_sha256"), fingerprint};
}

}  // namespace lowra
