// One base, at most one active user (lowra.device_runtime.runtime.DeviceRuntime without the Python threading):
// open a base, fingerprint its weights, verify a blob against it and merge it into per-user buffers.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "adapter.hpp"
#include "tensors.hpp"
#include "trust.hpp"

namespace lowra {

struct UserState {
  std::string adapter_id;
  std::string base_fingerprint;
  size_t file_bytes = 0;
  double effective_bits = 0;
  double load_ms = 0;
  double apply_ms = 0;
  std::vector<std::string> modules;                            // the modules whose weights the user changes
  std::unordered_map<std::string, std::vector<float>> merged;  // "<module>.weight" -> pristine + up @ down
};

// A base's adaptable modules as a blob's binding sees them: module -> [out, in] (null when the base lacks it), and
// module -> "sha256:..." of its float32 weight (formats.tensor_digest).
using ShapeOf = std::function<const std::vector<int64_t>*(const std::string& module)>;
using DigestOf = std::function<std::string(const std::string& module)>;

// formats.base_fingerprint over `modules`; `where` names the base in messages ("the base at PATH").
std::string base_fingerprint(const std::vector<std::string>& modules, const std::string& where,
                             const ShapeOf& shape_of, const DigestOf& digest_of);
// formats.check_base_binding: the blob's modules exist in the base with its shapes, and its fingerprint matches.
void check_base_binding(const Blob& blob, const std::string& where, const ShapeOf& shape_of,
                        const DigestOf& digest_of);
// How a user's blob is loaded: for whom (a signed blob for another user is refused) and with which key (an
// encrypted blob needs its user's 32-byte AES key). Null pointers: not said, no key.
struct LoadOptions {
  const std::string* user_id = nullptr;
  const uint8_t* decryption_key = nullptr;
  size_t decryption_key_size = 0;
};

// trust.open_blob: the size bound, the trust policy (signature, claims, decryption, replay), the v1 blob inside and
// its agreement with the claims, which land in `claims_out` (left null for an unsigned blob).
Blob open_blob(TrustPolicy& trust, const uint8_t* data, size_t size, const LoadOptions& options, Json* claims_out);

class Runtime {
 public:
  // A quantized base file (signed or not, as `trust` allows; null: the default policy, no key pinned) or a Hugging
  // Face model folder with model.safetensors (BaseWeights). The policy is kept for the users loaded on this base.
  explicit Runtime(const std::string& path, std::shared_ptr<TrustPolicy> trust = nullptr);

  const TensorTable& tensors() const { return tensors_; }
  const std::string& path() const { return path_; }
  // BaseWeights.fingerprint: missing modules are a BaseMismatch.
  std::string fingerprint(const std::vector<std::string>& modules);
  // DeviceRuntime.load_user (merge mode): on failure the previous state is kept.
  void load_user(const uint8_t* data, size_t size, const LoadOptions& options = {});
  void unload_user() { user_.reset(); }
  const UserState* user() const { return user_.get(); }
  // The tensor as the model computes with it now; null if the base has no such tensor.
  const float* weight(const std::string& name, const Tensor** tensor) const;

 private:
  std::string path_;
  TensorTable tensors_;
  std::shared_ptr<TrustPolicy> trust_;
  std::string content_digest_;  // a quantized base's payload_sha256 (empty for a model folder)
  std::unordered_map<std::string, std::string> digests_;
  std::unique_ptr<UserState> user_;

  const std::string& digest(const std::string& tensor_name);
  ShapeOf shape_of() const;
  DigestOf digest_of();
  void check_binding(const Blob& blob);
};

// runtime.merge_into: out = pristine + up @ down, in float32 (the product first, then one add).
void merge_into(float* out, const float* pristine, const float* up, const float* down, int64_t rows, int64_t kept,
                int64_t cols);

}  // namespace lowra
