#include "adapter.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "error.hpp"
#include "unicode.hpp"

namespace lowra {
namespace {

// adapter.LIMITS and the module bounds.
const Limits kBlobLimits{1ull << 20, 3, 256ull << 20, 1024};
constexpr int64_t kMaxFeatures = int64_t{1} << 20;
constexpr int64_t kMaxRank = 4096;
constexpr int64_t kMaxDecodedParams = int64_t{1} << 28;
constexpr uint8_t kWidthOfCode[4] = {0, 1, 2, 4};  // constants.ADAPTER_WIDTHS

// adapter.MODULE_NAME: ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$
bool dotted_module_path(const std::string& name) {
  auto word = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; };
  if (name.empty() || !(word(name[0]) && !(name[0] >= '0' && name[0] <= '9'))) return false;
  bool after_dot = false;
  for (size_t i = 1; i < name.size(); ++i) {
    if (name[i] == '.') {
      if (after_dot) return false;
      after_dot = true;
    } else if (word(name[i])) {
      after_dot = false;
    } else {
      return false;
    }
  }
  return !after_dot;
}

std::vector<AdapterModule> module_table(const Json& value, const std::string& what) {
  std::vector<AdapterModule> modules;
  for (const ModuleRow& row : module_entries(value, what, "name, out, in, rank")) {
    const std::string quoted = short_repr(row.name, 1 << 20);
    if (!dotted_module_path(row.name))
      fail(LOWRA_ERR_CONTENT, what + ": module name " + short_repr(row.name) + " is not a dotted module path");
    if (!(row.a >= 1 && row.a <= kMaxFeatures && row.b >= 1 && row.b <= kMaxFeatures))
      fail(LOWRA_ERR_CONTENT, what + ": module " + quoted + " shape [" + std::to_string(row.a) + ", " +
                                  std::to_string(row.b) + "] outside 1.." + std::to_string(kMaxFeatures));
    if (!(row.c >= 1 && row.c <= std::min({row.a, row.b, kMaxRank})))
      fail(LOWRA_ERR_CONTENT, what + ": module " + quoted + " rank " + std::to_string(row.c) +
                                  " outside 1..min(out, in, " + std::to_string(kMaxRank) + ")");
    modules.push_back({row.name, row.a, row.b, row.c});
  }
  int64_t n_params = 0;
  for (const auto& m : modules) n_params += m.rank * (m.in_features + m.out_features);
  if (n_params > kMaxDecodedParams)
    fail(LOWRA_ERR_CONTENT, what + ": the modules announce " + std::to_string(n_params) + " parameters, more than the " +
                                std::to_string(kMaxDecodedParams) + " limit");
  return modules;
}

// The index of element j of a channel packed LSB-first at `width` bits from byte `codes`.
inline unsigned code_at(const uint8_t* codes, int width, int64_t j) {
  int64_t bit = j * width;
  return (codes[bit >> 3] >> (bit & 7)) & ((1u << width) - 1);
}

void decode_channel(const Blob& blob, int64_t channel, float* out, int64_t stride) {
  int width = blob.widths[channel];
  int64_t length = blob.lengths[channel];
  if (width == 0) {
    for (int64_t j = 0; j < length; ++j) out[j * stride] = 0.0f;
    return;
  }
  const uint8_t* codes = blob.codes.data() + blob.code_offsets[channel];
  const float* levels = blob.codebooks.data() + blob.level_offsets[channel];
  for (int64_t j = 0; j < length; ++j) out[j * stride] = levels[code_at(codes, width, j)];
}

}  // namespace

Blob parse_blob(const uint8_t* data, size_t size, const std::string& what) {
  Header header = parse_header(data, size, what, kBlobLimits);
  check_envelope(header, what, "lowra-adapter", {"1"},
                 {"format", "format_version", "adapter_id", "base_fingerprint", "lora", "modules", "scheme",
                  "payload_sha256", "created", "card"},
                 "this is not a lowra adapter blob", "re-export the adapter");
  const TensorInfo* codes = header.find("codes");
  const TensorInfo* widths = header.find("widths");
  const TensorInfo* codebooks = header.find("codebooks");
  if (header.tensors.size() != 3 || !codes || !widths || !codebooks) {
    std::string listed;
    std::vector<std::string> sorted_names;
    for (const auto& t : header.tensors) sorted_names.push_back(t.name);
    std::sort(sorted_names.begin(), sorted_names.end());
    for (const auto& n : sorted_names) listed += (listed.empty() ? "" : ", ") + short_repr(n);
    fail(LOWRA_ERR_CONTENT, what + ": tensors [" + listed.substr(0, 60) +
                                "], expected exactly ['codebooks', 'codes', 'widths']");
  }
  for (const auto& [info, dtype, numpy] : {std::make_tuple(codes, "U8", "uint8"), std::make_tuple(widths, "U8", "uint8"),
                                           std::make_tuple(codebooks, "F16", "float16")}) {
    if (info->dtype != dtype || info->shape.size() != 1) {
      std::string shape;
      for (int64_t d : info->shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      fail(LOWRA_ERR_CONTENT, what + ": tensor '" + info->name + "' is " + numpy_dtype_str(info->dtype) + " [" + shape +
                                  "], expected 1-D " + numpy);
    }
  }
  verify_payload(header, data, what, "Re-download or re-export it");
  Json modules_json;
  for (const char* key : {"lora", "modules", "scheme", "card"}) {  // every JSON key strictly, before any is used
    Json value = decode_json_metadata(header, key, what);
    if (std::string(key) == "modules") modules_json = std::move(value);
  }
  Blob blob;
  blob.modules = module_table(modules_json, what);
  int64_t n_channels = 0;
  for (const auto& m : blob.modules) n_channels += 2 * m.rank;
  if (widths->numel() != (n_channels + 3) / 4)
    fail(LOWRA_ERR_CONTENT, what + ": bit map has " + std::to_string(widths->numel()) + " bytes, expected " +
                                std::to_string((n_channels + 3) / 4) + " for " + std::to_string(n_channels) + " channels");
  const uint8_t* packed = data + widths->start;
  blob.code_offsets.push_back(0);
  blob.level_offsets.push_back(0);
  blob.module_offsets.push_back(0);
  for (const auto& m : blob.modules) {
    for (int64_t k = 0; k < 2 * m.rank; ++k) {  // down channels, then up channels (docs/FORMAT.md channel order)
      int64_t c = static_cast<int64_t>(blob.widths.size());
      uint8_t w = kWidthOfCode[(packed[c >> 2] >> (2 * (c & 3))) & 3];
      int64_t length = k < m.rank ? m.in_features : m.out_features;
      blob.widths.push_back(w);
      blob.lengths.push_back(length);
      blob.code_offsets.push_back(blob.code_offsets.back() + (length * w + 7) / 8);
      blob.level_offsets.push_back(blob.level_offsets.back() + (w ? int64_t{1} << w : 0));
    }
    blob.module_offsets.push_back(blob.module_offsets.back() + 2 * m.rank);
    blob.n_params += m.rank * (m.in_features + m.out_features);
  }
  if (codes->numel() != blob.code_offsets.back())
    fail(LOWRA_ERR_CONTENT, what + ": tensor 'codes' has " + std::to_string(codes->numel()) +
                                " entries, the bit map implies " + std::to_string(blob.code_offsets.back()));
  if (codebooks->numel() != blob.level_offsets.back())
    fail(LOWRA_ERR_CONTENT, what + ": tensor 'codebooks' has " + std::to_string(codebooks->numel()) +
                                " entries, the bit map implies " + std::to_string(blob.level_offsets.back()));
  blob.codebooks.resize(codebooks->numel());
  to_float32("F16", data + codebooks->start, blob.codebooks.size(), blob.codebooks.data(), true);
  for (float level : blob.codebooks)
    if (!std::isfinite(level))
      fail(LOWRA_ERR_CONTENT, what + ": codebooks contain NaN or Inf; refusing to merge a non-finite adapter");
  for (size_t c = 0; c + 1 < blob.level_offsets.size(); ++c)
    for (int64_t i = blob.level_offsets[c] + 1; i < blob.level_offsets[c + 1]; ++i)
      if (blob.codebooks[i] < blob.codebooks[i - 1])
        fail(LOWRA_ERR_CONTENT, what + ": a codebook's levels are not in ascending order");
  blob.codes.assign(data + codes->start, data + codes->end);
  blob.adapter_id = header.metadata.at("adapter_id");
  blob.base_fingerprint = header.metadata.at("base_fingerprint");
  blob.file_bytes = size;
  return blob;
}

int64_t kept_components(const Blob& blob, size_t index) {
  const AdapterModule& m = blob.modules[index];
  const int64_t first = blob.module_offsets[index];
  int64_t kept = 0;
  for (int64_t k = 0; k < m.rank; ++k) kept += blob.widths[first + k] > 0 && blob.widths[first + m.rank + k] > 0;
  return kept;
}

Factors decode_factors(const Blob& blob, size_t index) {
  const AdapterModule& m = blob.modules[index];
  int64_t first = blob.module_offsets[index];
  std::vector<int64_t> keep;
  for (int64_t k = 0; k < m.rank; ++k)
    if (blob.widths[first + k] > 0 && blob.widths[first + m.rank + k] > 0) keep.push_back(k);
  Factors f;
  f.kept = static_cast<int64_t>(keep.size());
  f.down.resize(f.kept * m.in_features);
  f.up.resize(m.out_features * f.kept);
  for (int64_t i = 0; i < f.kept; ++i) {
    decode_channel(blob, first + keep[i], f.down.data() + i * m.in_features, 1);
    decode_channel(blob, first + m.rank + keep[i], f.up.data() + i, f.kept);  // column i of up
  }
  return f;
}

namespace {

// Channel `c`'s codes widened to 4-bit slots at `out` (ceil(length / 2) bytes, zeroed by the caller).
void widen_codes4(const Blob& blob, int64_t c, uint8_t* out) {
  const int w = blob.widths[c];
  const int64_t length = blob.lengths[c];
  const uint8_t* codes = blob.codes.data() + blob.code_offsets[c];
  if (w == 4) {  // the blob's own layout
    std::memcpy(out, codes, static_cast<size_t>((length + 1) / 2));
    return;
  }
  const int mask = (1 << w) - 1;
  for (int64_t j = 0; j < length; ++j) {
    const int code = (codes[(j * w) >> 3] >> ((j * w) & 7)) & mask;
    out[j >> 1] = static_cast<uint8_t>(out[j >> 1] | (code << ((j & 1) * 4)));
  }
}

void channel_book(const Blob& blob, int64_t c, uint16_t* out) {  // 16 slots, zeroed by the caller
  for (int64_t i = blob.level_offsets[c]; i < blob.level_offsets[c + 1]; ++i)
    out[i - blob.level_offsets[c]] = float_to_half(blob.codebooks[static_cast<size_t>(i)]);  // float16 levels: exact
}

}  // namespace

Packed4 pack_factors4(const Blob& blob, size_t index, int64_t rank) {
  const AdapterModule& m = blob.modules[index];
  const int64_t first = blob.module_offsets[index];
  const int64_t down_bytes = (m.in_features + 1) / 2, up_bytes = (m.out_features + 1) / 2;
  Packed4 p;
  p.down_codes.assign(static_cast<size_t>(rank * down_bytes), 0);
  p.up_codes.assign(static_cast<size_t>(rank * up_bytes), 0);
  p.down_books.assign(static_cast<size_t>(16 * rank), 0);
  p.up_books.assign(static_cast<size_t>(16 * rank), 0);
  int64_t slot = 0;
  for (int64_t k = 0; k < m.rank && slot < rank; ++k) {
    const int64_t down = first + k, up = first + m.rank + k;
    if (blob.widths[down] == 0 || blob.widths[up] == 0) continue;  // dropped: not kept (decode_factors' rule)
    widen_codes4(blob, down, p.down_codes.data() + slot * down_bytes);
    widen_codes4(blob, up, p.up_codes.data() + slot * up_bytes);
    channel_book(blob, down, p.down_books.data() + 16 * slot);
    channel_book(blob, up, p.up_books.data() + 16 * slot);
    ++slot;
  }
  return p;
}

}  // namespace lowra
