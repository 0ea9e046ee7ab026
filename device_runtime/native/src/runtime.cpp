#include "runtime.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "container.hpp"
#include "error.hpp"
#include "mapped_file.hpp"
#include "quantized_base.hpp"
#include "sha256.hpp"
#include "signed.hpp"
#include "unicode.hpp"

namespace lowra {

namespace {

// A Hugging Face model folder's model.safetensors: every tensor, F16/BF16/F64 floats widened to float32.
void read_model_folder(const std::string& folder, TensorTable& out) {
  std::string file = folder + "/model.safetensors";
  if (path_kind(file) != PathKind::File) {
    std::string sharded = path_kind(folder + "/model.safetensors.index.json") == PathKind::File
                              ? " (a sharded folder, model.safetensors.index.json, is not read by liblowra yet)"
                              : "";
    fail(LOWRA_ERR_BASE_NOT_FOUND, folder + " has no model.safetensors" + sharded +
                                       "; expected a Hugging Face model folder with safetensors weights or a quantized "
                                       "base file");
  }
  MappedFile mapped(file, "base weights " + file + " is missing");
  Header header = parse_header(mapped.data(), mapped.size(), file, Limits{});
  for (const TensorInfo& info : header.tensors) {
    Tensor t;
    t.shape = info.shape;
    t.floating = info.dtype == "F32" || info.dtype == "F16" || info.dtype == "BF16" || info.dtype == "F64";
    auto values = std::make_shared<std::vector<float>>(info.numel());
    to_float32(info.dtype, mapped.data() + info.start, values->size(), values->data(), true);
    t.values = std::move(values);
    out.add(info.name, std::move(t));
  }
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Runtime::Runtime(const std::string& path, std::shared_ptr<TrustPolicy> trust)
    : path_(path), trust_(trust ? std::move(trust) : std::make_shared<TrustPolicy>()) {
  switch (path_kind(path)) {
    case PathKind::File: {  // trust.open_quantized_base: a signed file is authenticated before any of it is parsed
      std::string what = "quantized base " + path;
      MappedFile mapped(path, what + " does not exist");
      Opened opened = trust_->open(mapped.data(), mapped.size(), "lowra-base", what, nullptr, nullptr, 0);
      BaseIdentity base = read_quantized_base(opened.body.data(), opened.body.size(), what, tensors_);
      if (opened.claims) {
        const Json& c = *opened.claims;
        const Json* bound = c.find("base_fingerprint");
        const Json* content = c.find("base_content");
        if (c.find("subject")->text != base.fingerprint || !bound->is_string() || bound->text != base.fingerprint ||
            !content->is_string() || content->text != base.payload_sha256)
          fail(LOWRA_ERR_CONTENT, what + ": the signed claims describe another base than the file inside");
      }
      content_digest_ = base.payload_sha256;
      break;
    }
    case PathKind::Directory:
      read_model_folder(path, tensors_);
      break;
    default:
      fail(LOWRA_ERR_BASE_NOT_FOUND, "base " + path + " does not exist; expected a Hugging Face model folder or a "
                                                      "quantized base file");
  }
}

const std::string& Runtime::digest(const std::string& tensor_name) {
  auto it = digests_.find(tensor_name);
  if (it != digests_.end()) return it->second;
  const Tensor& t = *tensors_.find(tensor_name);
  return digests_[tensor_name] = float32_digest(t.values->data(), t.values->size());
}

std::string base_fingerprint(const std::vector<std::string>& modules, const std::string& where,
                             const ShapeOf& shape_of, const DigestOf& digest_of) {
  std::vector<std::string> missing;
  for (const auto& m : modules)
    if (!shape_of(m)) missing.push_back(m + ".weight");
  if (!missing.empty())
    fail(LOWRA_ERR_BASE_MISMATCH, "the adapter targets " + std::to_string(missing.size()) + " module(s) " + where +
                                      " does not have (first: " + short_repr(missing[0], 1 << 20) +
                                      "); it was trained for another base model");
  std::vector<std::string> sorted = modules;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  Sha256 h;  // formats.base_fingerprint: sorted "module|[shape]|sha256(float32 weight)" lines
  for (const auto& m : sorted) h.update(m + "|" + shape_text(*shape_of(m)) + "|" + digest_of(m) + "\n");
  return "sha256:" + h.hex();
}

void check_base_binding(const Blob& blob, const std::string& where, const ShapeOf& shape_of,
                        const DigestOf& digest_of) {
  // formats.check_base_binding: every module known, every shape equal, then the fingerprint.
  std::vector<std::string> unknown;
  for (const auto& m : blob.modules)
    if (!shape_of(m.name)) unknown.push_back(m.name);
  if (!unknown.empty())
    fail(LOWRA_ERR_BASE_MISMATCH, "adapter " + short_repr(blob.adapter_id, 1 << 20) + " targets " +
                                      std::to_string(unknown.size()) + " module(s) " + where + " does not have (first: " +
                                      short_repr(unknown[0], 1 << 20) + "); it was trained for another base model");
  for (const auto& m : blob.modules) {
    const auto& shape = *shape_of(m.name);
    if (shape != std::vector<int64_t>{m.out_features, m.in_features})
      fail(LOWRA_ERR_CONTENT, "adapter module " + m.name + " is [" + std::to_string(m.out_features) + ", " +
                                  std::to_string(m.in_features) + "] but the base weight is " + shape_text(shape) +
                                  "; the adapter was made for another model");
  }
  std::vector<std::string> names;
  for (const auto& m : blob.modules) names.push_back(m.name);
  std::string expected = base_fingerprint(names, where, shape_of, digest_of);
  if (blob.base_fingerprint != expected)
    fail(LOWRA_ERR_BASE_MISMATCH, "adapter " + short_repr(blob.adapter_id, 1 << 20) + " was trained against base " +
                                      blob.base_fingerprint.substr(0, 23) + "..., but " + where + " is " +
                                      expected.substr(0, 23) + "...; load the base it was trained on or retrain the "
                                      "adapter for this base");
}

ShapeOf Runtime::shape_of() const {
  return [this](const std::string& module) -> const std::vector<int64_t>* {
    const Tensor* t = tensors_.find(module + ".weight");
    return t ? &t->shape : nullptr;
  };
}

DigestOf Runtime::digest_of() {
  return [this](const std::string& module) { return digest(module + ".weight"); };
}

std::string Runtime::fingerprint(const std::vector<std::string>& modules) {
  return base_fingerprint(modules, "the base at " + path_, shape_of(), digest_of());
}

void Runtime::check_binding(const Blob& blob) {
  check_base_binding(blob, "the loaded base at " + path_, shape_of(), digest_of());
}

void check_blob_size(size_t size) {
  if (size > kMaxBlobFileBytes)
    fail(LOWRA_ERR_BLOB, "blob of " + std::to_string(size) + " bytes is larger than any adapter blob can be");
}

Blob open_blob(TrustPolicy& trust, const uint8_t* data, size_t size, const LoadOptions& options, Json* claims_out) {
  check_blob_size(size);
  Opened opened = trust.open(data, size, "lowra-adapter", "blob", options.user_id, options.decryption_key,
                             options.decryption_key_size);
  Blob blob = parse_blob(opened.body.data(), static_cast<size_t>(opened.body.size()), "blob");
  if (opened.claims) {
    check_blob_claims(blob, *opened.claims, "blob");
    if (claims_out) *claims_out = std::move(*opened.claims);
  }
  return blob;
}

void Runtime::load_user(const uint8_t* data, size_t size, const LoadOptions& options) {
  auto start = std::chrono::steady_clock::now();
  Json claims;
  Blob blob = open_blob(*trust_, data, size, options, &claims);
  check_binding(blob);
  check_base_content(blob, &claims, content_digest_.empty() ? nullptr : &content_digest_, "the loaded base at " + path_);
  auto user = std::make_unique<UserState>();
  auto apply_start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < blob.modules.size(); ++i) {
    const AdapterModule& m = blob.modules[i];
    Factors f = decode_factors(blob, i);
    std::string name = m.name + ".weight";
    std::vector<float> merged(m.out_features * m.in_features);
    merge_into(merged.data(), tensors_.find(name)->values->data(), f.up.data(), f.down.data(), m.out_features, f.kept,
               m.in_features);
    user->merged[name] = std::move(merged);
    user->modules.push_back(m.name);
  }
  user->adapter_id = blob.adapter_id;
  user->base_fingerprint = blob.base_fingerprint;
  user->file_bytes = blob.file_bytes;
  user->effective_bits = 8.0 * static_cast<double>(blob.file_bytes) / static_cast<double>(std::max<int64_t>(blob.n_params, 1));
  user->apply_ms = ms_since(apply_start);
  user->load_ms = ms_since(start);
  user_ = std::move(user);  // published only once every check passed and every weight is merged
}

const float* Runtime::weight(const std::string& name, const Tensor** tensor) const {
  const Tensor* t = tensors_.find(name);
  if (!t) return nullptr;
  *tensor = t;
  if (user_) {
    auto it = user_->merged.find(name);
    if (it != user_->merged.end()) return it->second.data();
  }
  return t->values->data();
}

// Compiled twice on x86-64 (AVX2 and the baseline), the best one chosen when the library loads: the same operations in
// the same order (the build forbids contracting them into FMAs), 8 lanes instead of 4.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void merge_into(float* out, const float* pristine, const float* up, const float* down, int64_t rows, int64_t kept,
                int64_t cols) {
  // Row by row: out[r] = sum_k up[r, k] * down[k] accumulated in float32 in component order, then + pristine[r].
  // The order of the k-sum may differ from numpy's BLAS; each product of two float16 levels is exact in float32,
  // so results agree exactly whenever the partial sums are exact and otherwise within the bound the tests state.
  if (kept == 0) {  // every component dropped: the user's weight is the base's, bit for bit
    std::copy(pristine, pristine + rows * cols, out);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + r * cols;
    std::fill(dst, dst + cols, 0.0f);
    for (int64_t k = 0; k < kept; ++k) {
      const float a = up[r * kept + k];
      const float* src = down + k * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] += a * src[c];
    }
    const float* base = pristine + r * cols;
    for (int64_t c = 0; c < cols; ++c) dst[c] += base[c];
  }
}

}  // namespace lowra
