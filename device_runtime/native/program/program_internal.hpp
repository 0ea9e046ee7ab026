// Shared by program.cpp (one program + data file) and model.cpp (a model folder): error reporting through
// lowra_program_last_error() and the two ExecuTorch calls both make.
#pragma once

#include <executorch/extension/module/module.h>

#include <string>

#include "lowra_program.h"

namespace lowra_program_detail {

lowra_status fail(lowra_status status, std::string message);  // sets lowra_program_last_error(), returns status
lowra_status ok();                                             // clears it, returns LOWRA_OK
const char* last_error();
bool has_operator(const char* name);  // a kernel is registered for operator `name`

// module.load_method("forward"): a missing operator is LOWRA_ERR_KERNEL, any other refusal LOWRA_ERR_PROGRAM.
lowra_status load_forward(executorch::extension::module::Module& module, const std::string& what);
// lowra_program_forward's body on a loaded module.
lowra_status forward(executorch::extension::module::Module& module, const int64_t* ids, size_t n, int64_t start,
                     float* logits, size_t capacity, size_t* vocab);

}  // namespace lowra_program_detail
