// lowra_chat: the command-line app that links liblowra. It opens a base, then swaps users on commands read from
// stdin, one per line; generation comes with the ExecuTorch step (issue 14), so for now it proves the app side:
// open, load, swap, unload, and read weights, built and run in CI.
//
//   lowra_chat BASE            BASE: a quantized base file or a Hugging Face model folder
//   load FILE                  verify FILE against the base and merge it (replaces the current user)
//   unload                     back to the pristine base
//   sum NAME                   sha256 of the tensor NAME as the model sees it now (formats.tensor_digest)
//   user                       the active user, or "none"
//   quit                       (or end of input)
//
// Every reply is one line: "ok ...", or "error <code> <message>" (a refused blob keeps the previous user).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "lowra.h"

namespace {

bool read_file(const std::string& path, std::vector<uint8_t>& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

void report_error(lowra_status status) { std::printf("error %d %s\n", static_cast<int>(status), lowra_last_error()); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s BASE  (then commands on stdin: load FILE | unload | sum NAME | user | quit)\n",
                 argv[0]);
    return 2;
  }
  lowra_base* base = nullptr;
  lowra_status status = lowra_base_open(argv[1], &base);
  if (status != LOWRA_OK) {
    report_error(status);
    return 1;
  }
  std::printf("ok base %s tensors %zu\n", argv[1], lowra_tensor_count(base));
  std::string line;
  while (std::getline(std::cin, line)) {
    std::string command = line.substr(0, line.find(' '));
    std::string argument = line.size() > command.size() ? line.substr(command.size() + 1) : "";
    if (command == "load") {
      std::vector<uint8_t> blob;
      if (!read_file(argument, blob)) {
        std::printf("error %d cannot read %s\n", static_cast<int>(LOWRA_ERR_IO), argument.c_str());
      } else {
        lowra_user_info info;
        status = lowra_user_load(base, blob.data(), blob.size(), &info);
        if (status != LOWRA_OK) report_error(status);
        else std::printf("ok user %s modules %zu bits %.3f load_ms %.2f\n", info.adapter_id, info.n_modules,
                         info.effective_bits, info.load_ms);
      }
    } else if (command == "unload") {
      status = lowra_user_unload(base);
      if (status != LOWRA_OK) report_error(status);
      else std::printf("ok unloaded\n");
    } else if (command == "sum") {
      char digest[65];
      status = lowra_weight_digest(base, argument.c_str(), digest, sizeof digest);
      if (status != LOWRA_OK) report_error(status);
      else std::printf("ok sum %s %s\n", argument.c_str(), digest);
    } else if (command == "user") {
      lowra_user_info info;
      status = lowra_user_current(base, &info);
      if (status == LOWRA_ERR_NO_USER) std::printf("ok user none\n");
      else if (status != LOWRA_OK) report_error(status);
      else std::printf("ok user %s\n", info.adapter_id);
    } else if (command == "quit") {
      break;
    } else if (!command.empty()) {
      std::printf("error %d unknown command '%s'; expected load FILE, unload, sum NAME, user or quit\n",
                  static_cast<int>(LOWRA_ERR_ARGUMENT), command.c_str());
    }
    std::fflush(stdout);
  }
  lowra_base_close(base);
  return 0;
}
