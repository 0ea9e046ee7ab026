// The base's tensors as the model computes with them: float32 values nobody writes to, by name.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace lowra {

// "[2, 3]": a shape as Python prints a list (messages and fingerprint lines).
inline std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

struct Tensor {
  std::vector<int64_t> shape;
  // Floating point in the Python reference (exposed by lowra_weight); other tensors (int64 ids, a quantized
  // base's BF16 kept as uint16 by numpy) hold their values cast to float32, which is what their digest hashes.
  bool floating = true;
  std::shared_ptr<const std::vector<float>> values;  // shared by tied tensors (aliases)
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct TensorTable {
  std::vector<std::string> names;  // file order, aliases last
  std::unordered_map<std::string, Tensor> by_name;
  void add(const std::string& name, Tensor tensor) {
    if (by_name.emplace(name, std::move(tensor)).second) names.push_back(name);
  }
  const Tensor* find(const std::string& name) const {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : &it->second;
  }
};

}  // namespace lowra
