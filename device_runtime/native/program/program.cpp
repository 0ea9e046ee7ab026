// lowra_program: an exported lowra ExecuTorch program run through the ExecuTorch C++ runtime (lowra_program.h).
//
// The Python engine (lowra.device_runtime.engines.executorch) calls this library through ctypes, so neither the
// engine nor anything else in lowra's device runtime needs ExecuTorch's Python binding, which links libtorch. An app
// links it the same way. Inputs are wrapped without copies (TensorImpl over the caller's buffers); the logits are
// copied out once, because the output tensor lives in the method's planned memory and the next call reuses it.
#include "lowra_program.h"

#include <executorch/extension/module/module.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include "program_internal.hpp"

#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <sys/stat.h>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

thread_local std::string error_text;

std::string describe(Error error) {
  char code[16];
  std::snprintf(code, sizeof code, "0x%02x", static_cast<unsigned>(error));
  return std::string(executorch::runtime::to_string(error)) + " (" + code + ")";
}

bool is_file(const char* path) {
  struct stat info {};
  return path != nullptr && ::stat(path, &info) == 0 && S_ISREG(info.st_mode);
}

}  // namespace

namespace lowra_program_detail {

lowra_status fail(lowra_status status, std::string message) {
  error_text = std::move(message);
  return status;
}

lowra_status ok() {
  error_text.clear();
  return LOWRA_OK;
}

const char* last_error() { return error_text.c_str(); }

bool has_operator(const char* name) {
  if (name == nullptr) return false;
  const auto kernels = executorch::runtime::get_registered_kernels();
  for (size_t i = 0; i < kernels.size(); ++i) {
    if (kernels[i].name_ != nullptr && std::strcmp(kernels[i].name_, name) == 0) return true;
  }
  return false;
}

lowra_status load_forward(Module& module, const std::string& what) {
  const Error error = module.load_method("forward");
  if (error == Error::OperatorMissing) {
    return fail(LOWRA_ERR_KERNEL, "ExecuTorch cannot run " + what + ": an operator has no kernel (" +
                                  describe(error) + "). Custom-op programs need lowra's kernel library loaded first "
                                  "(python -m lowra.export.executorch.kernels)");
  }
  if (error != Error::Ok) {
    return fail(LOWRA_ERR_PROGRAM, "ExecuTorch refused " + what + ": " + describe(error) + ". The program or its "
                                   "data is corrupted or they come from different exports; re-export or copy the "
                                   "folder again");
  }
  return ok();
}

lowra_status forward(Module& module, const int64_t* ids, size_t n, int64_t start, float* logits, size_t capacity,
                     size_t* vocab) {
  if (ids == nullptr || vocab == nullptr || n == 0) {
    return fail(LOWRA_ERR_ARGUMENT, "forward: ids and vocab must not be null, n >= 1");
  }
  if (start < 0) {
    return fail(LOWRA_ERR_ARGUMENT, "forward: start must be >= 0, got " + std::to_string(start));
  }
  std::vector<int64_t> positions(n);
  for (size_t i = 0; i < n; ++i) positions[i] = start + static_cast<int64_t>(i);
  TensorImpl::SizesType id_sizes[2] = {1, static_cast<TensorImpl::SizesType>(n)};
  TensorImpl::DimOrderType id_order[2] = {0, 1};
  TensorImpl::StridesType id_strides[2] = {static_cast<TensorImpl::StridesType>(n), 1};
  TensorImpl::SizesType pos_sizes[1] = {static_cast<TensorImpl::SizesType>(n)};
  TensorImpl::DimOrderType pos_order[1] = {0};
  TensorImpl::StridesType pos_strides[1] = {1};
  TensorImpl id_impl(ScalarType::Long, 2, id_sizes, const_cast<int64_t*>(ids), id_order, id_strides);
  TensorImpl pos_impl(ScalarType::Long, 1, pos_sizes, positions.data(), pos_order, pos_strides);
  const std::vector<EValue> inputs{EValue(Tensor(&id_impl)), EValue(Tensor(&pos_impl))};
  auto result = module.execute("forward", inputs);
  if (!result.ok()) {
    return fail(LOWRA_ERR_PROGRAM, "running forward on " + std::to_string(n) + " tokens at position " +
                                   std::to_string(start) + " failed: " + describe(result.error()) +
                                   " (the program takes 1..max_seq_len-1 tokens, positions below max_seq_len)");
  }
  const auto& outputs = result.get();
  if (outputs.empty() || !outputs[0].isTensor()) {
    return fail(LOWRA_ERR_PROGRAM, "the program's first output is not a tensor; expected logits [1, n, vocab]");
  }
  const Tensor out = outputs[0].toTensor();
  // Every position's logits [1, n, vocab], or the last position's [1, 1, vocab] (exported with logits "last").
  if (out.scalar_type() != ScalarType::Float || out.dim() != 3 || out.size(0) != 1 ||
      (out.size(1) != static_cast<ssize_t>(n) && out.size(1) != 1)) {
    return fail(LOWRA_ERR_PROGRAM, "the program's logits are not float32 [1, " + std::to_string(n) +
                                   " or 1, vocab]; this is not a lowra decoder program");
  }
  *vocab = static_cast<size_t>(out.size(2));
  const size_t count = static_cast<size_t>(out.size(1)) * *vocab;
  if (logits != nullptr && capacity >= count) {
    std::memcpy(logits, out.const_data_ptr<float>(), count * sizeof(float));
  } else if (capacity != 0) {
    return fail(LOWRA_ERR_ARGUMENT, "logits buffer holds " + std::to_string(capacity) + " floats; " +
                                    std::to_string(count) + " needed (rows x vocab)");
  }
  return ok();
}

}  // namespace lowra_program_detail

using lowra_program_detail::fail;
using lowra_program_detail::ok;

struct lowra_program {
  std::unique_ptr<Module> module;
  std::string program_path;
  std::string data_path;
};

extern "C" {

const char* lowra_program_last_error(void) { return lowra_program_detail::last_error(); }

lowra_status lowra_program_open(const char* program_path, const char* data_path, lowra_program** out) {
  if (out == nullptr || program_path == nullptr || data_path == nullptr) {
    return fail(LOWRA_ERR_ARGUMENT, "lowra_program_open: program path, data path and out must not be null");
  }
  *out = nullptr;
  for (const char* path : {program_path, data_path}) {
    if (!is_file(path)) {
      return fail(LOWRA_ERR_BASE_NOT_FOUND, std::string(path) + " does not exist or is not a file; expected the "
                                                                 "model folder's .pte program and its .ptd data");
    }
  }
  try {
    auto program = std::make_unique<lowra_program>();
    program->program_path = program_path;
    program->data_path = data_path;
    program->module = std::make_unique<Module>(program->program_path, program->data_path, Module::LoadMode::Mmap);
    const lowra_status status = lowra_program_detail::load_forward(
        *program->module, std::string(program_path) + " with data " + data_path);
    if (status != LOWRA_OK) return status;
    *out = program.release();
    return ok();
  } catch (const std::bad_alloc&) {
    return fail(LOWRA_ERR_INTERNAL, "out of memory while loading the program");
  } catch (const std::exception& exc) {
    return fail(LOWRA_ERR_INTERNAL, std::string("loading the program failed: ") + exc.what());
  }
}

lowra_status lowra_program_forward(lowra_program* program, const int64_t* ids, size_t n, int64_t start,
                                   float* logits, size_t capacity, size_t* vocab) {
  if (program == nullptr) return fail(LOWRA_ERR_ARGUMENT, "lowra_program_forward: program must not be null");
  try {
    return lowra_program_detail::forward(*program->module, ids, n, start, logits, capacity, vocab);
  } catch (const std::bad_alloc&) {
    return fail(LOWRA_ERR_INTERNAL, "out of memory while running the program");
  } catch (const std::exception& exc) {
    return fail(LOWRA_ERR_INTERNAL, std::string("running the program failed: ") + exc.what());
  }
}

void lowra_program_close(lowra_program* program) { delete program; }

int lowra_program_has_operator(const char* name) { return lowra_program_detail::has_operator(name) ? 1 : 0; }

}  // extern "C"
