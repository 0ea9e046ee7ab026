// The one exception type inside liblowra: a status code (the Python error class it mirrors) and a message.
// It never crosses the C ABI: lowra.cpp turns it into a lowra_status and lowra_last_error().
#pragma once

#include <stdexcept>
#include <string>

#include "lowra.h"

namespace lowra {

class Error : public std::runtime_error {
 public:
  Error(lowra_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  lowra_status status() const { return status_; }

 private:
  lowra_status status_;
};

[[noreturn]] inline void fail(lowra_status status, const std::string& message) { throw Error(status, message); }

}  // namespace lowra
