// The C ABI (include/lowra.h): every entry point catches everything, so no C++ exception crosses the boundary.
#include "lowra.h"

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "error.hpp"
#include "runtime.hpp"
#include "sha256.hpp"
#include "signed.hpp"
#include "trust.hpp"

struct lowra_base {
  lowra::Runtime runtime;
  lowra_base(const std::string& path, std::shared_ptr<lowra::TrustPolicy> trust) : runtime(path, std::move(trust)) {}
};

namespace {

thread_local std::string last_error;

template <typename F>
lowra_status guarded(F&& body) {
  try {
    last_error.clear();
    body();
    return LOWRA_OK;
  } catch (const lowra::Error& e) {
    last_error = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return LOWRA_ERR_INTERNAL;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return LOWRA_ERR_INTERNAL;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return LOWRA_ERR_INTERNAL;
  }
}

void require(bool ok, const char* message) {
  if (!ok) lowra::fail(LOWRA_ERR_ARGUMENT, message);
}

void copy_out(const std::string& text, char* out, size_t out_size, const char* what) {
  if (text.size() + 1 > out_size)
    lowra::fail(LOWRA_ERR_ARGUMENT, std::string(what) + " needs a buffer of " + std::to_string(text.size() + 1) +
                                        " bytes, got " + std::to_string(out_size));
  std::memcpy(out, text.c_str(), text.size() + 1);
}

void fill_info(const lowra::UserState& user, lowra_user_info* info) {
  info->adapter_id = user.adapter_id.c_str();
  info->base_fingerprint = user.base_fingerprint.c_str();
  info->n_modules = user.modules.size();
  info->file_bytes = user.file_bytes;
  info->effective_bits = user.effective_bits;
  info->load_ms = user.load_ms;
  info->apply_ms = user.apply_ms;
}

const float* floating_weight(lowra_base* base, const char* name, const lowra::Tensor** tensor) {
  require(base && name, "lowra_weight: base and name must not be null");
  const float* data = base->runtime.weight(name, tensor);
  if (!data) lowra::fail(LOWRA_ERR_ARGUMENT, std::string("the base has no tensor '") + name + "'");
  if (!(*tensor)->floating)
    lowra::fail(LOWRA_ERR_ARGUMENT, std::string("tensor '") + name +
                                        "' is not floating point in the base; lowra_weight returns float32 tensors only");
  return data;
}

}  // namespace

extern "C" {

const char* lowra_last_error(void) { return last_error.c_str(); }
const char* lowra_version(void) { return "0.1.0"; }
int lowra_abi_version(void) { return LOWRA_ABI_VERSION; }

lowra_status lowra_trust_new(lowra_trust** out) {
  return guarded([&] {
    require(out != nullptr, "lowra_trust_new: out must not be null");
    *out = nullptr;
    *out = new lowra_trust();
  });
}

void lowra_trust_free(lowra_trust* trust) { delete trust; }

lowra_status lowra_trust_pin_key(lowra_trust* trust, const uint8_t* key, size_t key_size, char* key_id_out,
                                 size_t key_id_size) {
  return guarded([&] {
    require(trust && key, "lowra_trust_pin_key: trust and key must not be null");
    const lowra::PublicKey raw = lowra::load_public_key(key, key_size);
    const std::string id = lowra::key_id(raw);
    if (key_id_out) copy_out(id, key_id_out, key_id_size, "lowra_trust_pin_key");
    trust->policy->pin(raw);
  });
}

lowra_status lowra_trust_revoke(lowra_trust* trust, const uint8_t* list, size_t list_size) {
  return guarded([&] {
    require(trust && list, "lowra_trust_revoke: trust and list must not be null");
    for (const std::string& id : lowra::decode_revocations(list, list_size, "revocation list"))
      trust->policy->revoked.insert(id);
  });
}

lowra_status lowra_trust_allow_unsigned(lowra_trust* trust, int allow) {
  return guarded([&] {
    require(trust != nullptr, "lowra_trust_allow_unsigned: trust must not be null");
    require(allow >= -1 && allow <= 1, "lowra_trust_allow_unsigned: allow is 1 (yes), 0 (no) or -1 (the default)");
    trust->policy->allow_unsigned = allow;
  });
}

lowra_status lowra_trust_set_device(lowra_trust* trust, const char* device_id) {
  return guarded([&] {
    require(trust != nullptr, "lowra_trust_set_device: trust must not be null");
    if (device_id) trust->policy->device_id = device_id;
    else trust->policy->device_id.reset();
  });
}

lowra_status lowra_trust_set_sequence_file(lowra_trust* trust, const char* path) {
  return guarded([&] {
    require(trust && path && *path, "lowra_trust_set_sequence_file: trust and a non-empty path are needed");
    trust->policy->sequences.use_file(path);
  });
}

lowra_status lowra_trust_set_time(lowra_trust* trust, int64_t unix_seconds) {
  return guarded([&] {
    require(trust != nullptr, "lowra_trust_set_time: trust must not be null");
    constexpr int64_t kLimit = INT64_MAX / 1000000 - 1;  // the checks add the clock skew in microseconds
    if (unix_seconds == LOWRA_SYSTEM_TIME) {
      trust->policy->fixed_time.reset();
      return;
    }
    require(unix_seconds > -kLimit && unix_seconds < kLimit, "lowra_trust_set_time: time out of range");
    trust->policy->fixed_time = unix_seconds * 1000000;
  });
}

lowra_status lowra_base_open(const char* path, lowra_base** out) { return lowra_base_open_trusted(path, nullptr, out); }

lowra_status lowra_base_open_trusted(const char* path, lowra_trust* trust, lowra_base** out) {
  return guarded([&] {
    require(path && out, "lowra_base_open: path and out must not be null");
    *out = nullptr;
    *out = new lowra_base(path, trust ? trust->policy : nullptr);
  });
}

void lowra_base_close(lowra_base* base) { delete base; }

lowra_status lowra_base_fingerprint(lowra_base* base, const char* const* modules, size_t n_modules, char* out,
                                    size_t out_size) {
  return guarded([&] {
    require(base && out && (modules || n_modules == 0), "lowra_base_fingerprint: null argument");
    std::vector<std::string> names;
    for (size_t i = 0; i < n_modules; ++i) {
      require(modules[i] != nullptr, "lowra_base_fingerprint: a module name is null");
      names.emplace_back(modules[i]);
    }
    copy_out(base->runtime.fingerprint(names), out, out_size, "lowra_base_fingerprint");
  });
}

lowra_status lowra_user_load(lowra_base* base, const uint8_t* blob, size_t blob_size, lowra_user_info* info) {
  return lowra_user_load_signed(base, blob, blob_size, nullptr, nullptr, 0, info);
}

lowra_status lowra_user_load_signed(lowra_base* base, const uint8_t* blob, size_t blob_size, const char* user_id,
                                    const uint8_t* decryption_key, size_t key_size, lowra_user_info* info) {
  return guarded([&] {
    require(base && (blob || blob_size == 0), "lowra_user_load: base and blob must not be null");
    static const uint8_t empty = 0;
    const std::string user = user_id ? user_id : "";
    lowra::LoadOptions options;
    options.user_id = user_id ? &user : nullptr;
    options.decryption_key = decryption_key;
    options.decryption_key_size = decryption_key ? key_size : 0;
    base->runtime.load_user(blob ? blob : &empty, blob_size, options);
    if (info) fill_info(*base->runtime.user(), info);
  });
}

lowra_status lowra_user_unload(lowra_base* base) {
  return guarded([&] {
    require(base != nullptr, "lowra_user_unload: base must not be null");
    base->runtime.unload_user();
  });
}

lowra_status lowra_user_current(lowra_base* base, lowra_user_info* info) {
  return guarded([&] {
    require(base && info, "lowra_user_current: base and info must not be null");
    if (!base->runtime.user()) lowra::fail(LOWRA_ERR_NO_USER, "no user is loaded; the base is pristine");
    fill_info(*base->runtime.user(), info);
  });
}

lowra_status lowra_weight(lowra_base* base, const char* name, const float** data, int64_t* shape, size_t max_dims,
                          size_t* ndim) {
  return guarded([&] {
    require(data && ndim && (shape || max_dims == 0), "lowra_weight: data, shape and ndim must not be null");
    const lowra::Tensor* tensor = nullptr;
    const float* values = floating_weight(base, name, &tensor);
    if (tensor->shape.size() > max_dims)
      lowra::fail(LOWRA_ERR_ARGUMENT, std::string("tensor '") + name + "' has " + std::to_string(tensor->shape.size()) +
                                          " dimensions, the shape buffer holds " + std::to_string(max_dims));
    std::copy(tensor->shape.begin(), tensor->shape.end(), shape);
    *ndim = tensor->shape.size();
    *data = values;
  });
}

lowra_status lowra_weight_digest(lowra_base* base, const char* name, char* out, size_t out_size) {
  return guarded([&] {
    require(out != nullptr, "lowra_weight_digest: out must not be null");
    const lowra::Tensor* tensor = nullptr;
    const float* values = floating_weight(base, name, &tensor);
    copy_out(lowra::float32_digest(values, static_cast<size_t>(tensor->numel())), out, out_size, "lowra_weight_digest");
  });
}

size_t lowra_tensor_count(lowra_base* base) { return base ? base->runtime.tensors().names.size() : 0; }

const char* lowra_tensor_name(lowra_base* base, size_t index) {
  if (!base || index >= base->runtime.tensors().names.size()) return nullptr;
  return base->runtime.tensors().names[index].c_str();
}

}  // extern "C"
