// The lowra adapter blob, format v1 (docs/FORMAT.md "Adapter blob"; lowra.device_runtime.formats.adapter):
// parse and verify like parse_blob, then decode factors like Blob.all_factors(drop_empty=True).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.hpp"

namespace lowra {

struct AdapterModule {
  std::string name;
  int64_t out_features, in_features, rank;
};

struct Blob {
  std::string adapter_id;
  std::string base_fingerprint;
  std::vector<AdapterModule> modules;
  std::vector<uint8_t> widths;         // per channel: 0, 1, 2 or 4
  std::vector<int64_t> lengths;        // per channel
  std::vector<int64_t> code_offsets;   // [channels + 1] into codes
  std::vector<int64_t> level_offsets;  // [channels + 1] into codebooks
  std::vector<int64_t> module_offsets; // [modules + 1] into channels
  std::vector<uint8_t> codes;
  std::vector<float> codebooks;  // float32 copies of the float16 levels
  size_t file_bytes = 0;
  int64_t n_params = 0;  // of the uncompressed LoRA adapter: sum of rank * (in + out)
};

// The largest file that can be a blob (adapter.MAX_FILE_BYTES): refused before it is read.
constexpr uint64_t kMaxBlobFileBytes = 8 + (1ull << 20) + (256ull << 20) + (1ull << 20);

// parse_blob: container, format/version, tensors, checksum, JSON metadata, module table, bit map, lengths, levels.
Blob parse_blob(const uint8_t* data, size_t size, const std::string& what);

// One module's factors with the components whose down or up channel is dropped (width 0) left out:
// up is [out, kept] and down [kept, in], row-major float32, delta = up @ down.
struct Factors {
  int64_t kept = 0;
  std::vector<float> up, down;
};
Factors decode_factors(const Blob& blob, size_t module);
// How many components decode_factors keeps (down and up widths both > 0), without decoding them.
int64_t kept_components(const Blob& blob, size_t module);

// The same components as decode_factors (kept ones first, in order), as 4-bit codes in `rank` slots: down_codes
// [rank, ceil(in / 2)] and up_codes [rank, ceil(out / 2)] (two codes per byte, the even one in the low nibble: a
// blob's 4-bit channel layout; 1- and 2-bit channels widened), books float16 bits [rank, 16] (the channel's levels,
// then zeros); slots past the kept components are all zero. rank >= kept (the caller checks).
struct Packed4 {
  std::vector<uint8_t> down_codes, up_codes;
  std::vector<uint16_t> down_books, up_books;
};
Packed4 pack_factors4(const Blob& blob, size_t module, int64_t rank);

}  // namespace lowra
