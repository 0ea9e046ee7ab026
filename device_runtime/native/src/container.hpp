// The container every lowra file uses: a strict safetensors parser plus lowra's metadata envelope
// (lowra.device_runtime.formats.container, check for check, in the same order where the error kind depends on it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "json.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "liblowra reads little-endian files in place; big-endian hosts are not supported"
#endif

namespace lowra {

// Bounds a reader enforces before it allocates anything a file announces (container.Limits).
struct Limits {
  uint64_t max_header_bytes = 100ull * 1024 * 1024;
  uint64_t max_tensors = 1000000;
  uint64_t max_data_bytes = 1ull << 40;
  uint64_t max_name_bytes = 1024;
};

constexpr size_t kMaxDims = 8;
constexpr int64_t kMaxDim = int64_t{1} << 40;

struct TensorInfo {
  std::string name;
  std::string dtype;  // safetensors name: F32, F16, BF16, U8, ...
  std::vector<int64_t> shape;
  uint64_t start = 0;  // absolute byte offsets in the file
  uint64_t end = 0;
  int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // in the header's order
  std::unordered_map<std::string, size_t> index;
  std::map<std::string, std::string> metadata;  // byte order = Python's code point order of str keys
  uint64_t data_offset = 0;                     // 8 + JSON length: the container's own overhead
  const TensorInfo* find(const std::string& name) const;
};

// Bytes per element of a safetensors dtype, and the numpy dtype str the reference hashes (container.DTYPES).
size_t dtype_size(const std::string& dtype);
const char* numpy_dtype_str(const std::string& dtype);
// Convert `count` elements at `data` to float32 as numpy's astype does (float16/bfloat16 exactly). With
// `bf16_as_float` false a BF16 tensor is read as the uint16 numpy holds it as.
void to_float32(const std::string& dtype, const uint8_t* data, size_t count, float* out, bool bf16_as_float);
float half_to_float(uint16_t bits);
// float32 -> float16 bits as numpy's astype does: round to nearest even, overflow to infinity, NaN kept NaN.
uint16_t float_to_half(float value);
// float_to_half over `count` values (F16C's conversion, the same rounding, where the CPU has it).
void floats_to_halves(const float* values, size_t count, uint16_t* out);

// container.parse_header over a file of `file_size` bytes, all of them at `data`.
Header parse_header(const uint8_t* data, uint64_t file_size, const std::string& what, const Limits& limits);

// container.check_name: a printable string of valid UTF-8 within `max_bytes` (BlobError otherwise).
std::string check_name(const Json& name, const std::string& what, const std::string& field, size_t max_bytes = 1024);

struct ModuleRow {
  std::string name;
  int64_t a, b, c;  // out, in, then rank (adapter) or group size (base); overflowing ints hold INT64_MAX
};
// container.module_entries: a non-empty list of [name, int, int, int], each name printable and listed once.
std::vector<ModuleRow> module_entries(const Json& value, const std::string& what, const std::string& fields);

// container.payload_digest over every tensor of `header` (bytes at `data`) and every metadata entry but itself.
std::string payload_digest(const Header& header, const uint8_t* data);
// container.check_envelope: the format name, a version this reader knows (`reads`, spelled exactly), and the
// required keys.
void check_envelope(const Header& header, const std::string& what, const std::string& format_name,
                    const std::vector<std::string>& reads, const std::vector<std::string>& required,
                    const std::string& not_this, const std::string& remedy);
// container.verify_payload.
void verify_payload(const Header& header, const uint8_t* data, const std::string& what, const std::string& remedy);
// container.decode_json_metadata for one key (BlobContentError when it is not strict JSON in canonical form).
Json decode_json_metadata(const Header& header, const std::string& key, const std::string& what);

}  // namespace lowra
