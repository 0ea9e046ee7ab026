// The quantized base file, "lowra-base" versions 1 to 4 (docs/FORMAT.md "Quantized base";
// lowra.device_runtime.formats.quantized_base): verify like read_quantized_base, decode like
// QuantizedBase.dequantized_state_dict().
#pragma once

#include <cstdint>
#include <string>

#include "tensors.hpp"

namespace lowra {

// What a verified base file says it is: its payload_sha256 (the content every tensor hashes to) and its quantized
// fingerprint (what adapters trained on it name).
struct BaseIdentity {
  std::string payload_sha256;
  std::string fingerprint;
};

// Verify the file's bytes and decode every tensor into `out`.
BaseIdentity read_quantized_base(const uint8_t* data, uint64_t size, const std::string& what, TensorTable& out);

}  // namespace lowra
