// lowra_chat: the command-line app that links liblowra. It opens a base or an exported model folder, then swaps
// users and generates on commands read from stdin, one per line; built and run in CI.
//
//   lowra_chat [OPTIONS] BASE          BASE: a quantized base file or a Hugging Face model folder (weights only)
//   lowra_chat [OPTIONS] MODEL [MODE]  MODEL: an ExecuTorch model folder (manifest.json), MODE side (default) or
//                                      merge; needs liblowra_program (built when CMake finds the ExecuTorch runtime)
//   options (signed files, docs/FORMAT.md "Signed files"):
//     --key PUBLIC.pem         trust files signed by this key (repeatable); then unsigned files are refused
//     --revocations FILE       the keys of this revocation list (revocations.json) are refused
//     --user ID                the user this app loads blobs for (a signed blob of another user is refused)
//     --decryption-key FILE    the user's 32-byte AES key, for encrypted blobs
//   load FILE                  verify FILE against the base and apply it (replaces the current user)
//   unload                     back to the pristine base
//   generate N ID ID ...       (MODEL) up to N greedy tokens after the prompt's token ids: "ok tokens ID ID ..."
//   sum NAME                   (BASE) sha256 of the tensor NAME as the model sees it now (formats.tensor_digest)
//   user                       the active user, or "none"
//   quit                       (or end of input)
//
// The app owns tokenization: prompts and replies are token ids. Every reply is one line: "ok ...", or
// "error <code> <message>" (a refused blob keeps the previous user).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "lowra.h"
#ifdef LOWRA_WITH_PROGRAM
#include <sstream>
#include <sys/stat.h>

#include "lowra_model.h"
#endif

namespace {

bool read_file(const std::string& path, std::vector<uint8_t>& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

void report_error(lowra_status status) { std::printf("error %d %s\n", static_cast<int>(status), lowra_last_error()); }

// The options: a trust policy (null when no key is pinned: the default policy), the user, the decryption key.
struct Options {
  lowra_trust* trust = nullptr;
  std::string user;
  bool has_user = false;
  std::vector<uint8_t> decryption_key;
  const char* user_id() const { return has_user ? user.c_str() : nullptr; }
  const uint8_t* key() const { return decryption_key.empty() ? nullptr : decryption_key.data(); }
};

// Parse the options before the positional arguments; false (after a message) on a bad one.
bool parse_options(int argc, char** argv, Options& options, std::vector<std::string>& positional) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg != "--key" && arg != "--revocations" && arg != "--user" && arg != "--decryption-key") {
      positional.push_back(arg);
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", arg.c_str());
      return false;
    }
    const std::string value = argv[++i];
    if (arg == "--user") {
      options.user = value, options.has_user = true;
      continue;
    }
    std::vector<uint8_t> bytes;
    if (!read_file(value, bytes)) {
      std::fprintf(stderr, "cannot read %s (%s)\n", value.c_str(), arg.c_str());
      return false;
    }
    lowra_status status = LOWRA_OK;
    if (arg == "--decryption-key") {
      options.decryption_key = bytes;
      continue;
    }
    if (!options.trust && (status = lowra_trust_new(&options.trust)) != LOWRA_OK) {
      report_error(status);
      return false;
    }
    status = arg == "--key" ? lowra_trust_pin_key(options.trust, bytes.data(), bytes.size(), nullptr, 0)
                            : lowra_trust_revoke(options.trust, bytes.data(), bytes.size());
    if (status != LOWRA_OK) {
      report_error(status);
      return false;
    }
  }
  return true;
}

#ifdef LOWRA_WITH_PROGRAM
bool is_model_folder(const std::string& path) {
  struct stat info {};
  return ::stat((path + "/manifest.json").c_str(), &info) == 0;
}

void report_program_error(lowra_status status) {
  std::printf("error %d %s\n", static_cast<int>(status), lowra_program_last_error());
}

int run_model(const std::string& folder, const std::string& mode, const Options& options) {
  lowra_model* model = nullptr;
  lowra_status status = lowra_model_open(folder.c_str(), mode.c_str(), 1, &model);
  if (status == LOWRA_OK && options.trust) status = lowra_model_set_trust(model, options.trust);
  if (status != LOWRA_OK) {
    report_program_error(status);
    lowra_model_close(model);
    return 1;
  }
  std::printf("ok model %s mode %s vocab %zu positions %zu\n", folder.c_str(), mode.c_str(),
              lowra_model_vocab_size(model), lowra_model_max_seq_len(model));
  std::string line, current = "none";
  while (std::getline(std::cin, line)) {
    std::istringstream words(line);
    std::string command;
    words >> command;
    if (command == "load") {
      std::string path;
      std::getline(words >> std::ws, path);
      std::vector<uint8_t> blob;
      lowra_user_info info;
      if (!read_file(path, blob)) {
        std::printf("error %d cannot read %s\n", static_cast<int>(LOWRA_ERR_IO), path.c_str());
      } else if ((status = lowra_model_user_load_signed(model, blob.data(), blob.size(), options.user_id(),
                                                        options.key(), options.decryption_key.size(), &info)) !=
                 LOWRA_OK) {
        report_program_error(status);
      } else {
        current = info.adapter_id;
        std::printf("ok user %s modules %zu bits %.3f load_ms %.2f\n", info.adapter_id, info.n_modules,
                    info.effective_bits, info.load_ms);
      }
    } else if (command == "unload") {
      if ((status = lowra_model_user_unload(model)) != LOWRA_OK) report_program_error(status);
      else std::printf("ok unloaded\n"), current = "none";
    } else if (command == "generate") {
      size_t max_new = 0;
      std::vector<int64_t> prompt;
      int64_t id;
      words >> max_new;
      while (words >> id) prompt.push_back(id);
      std::vector<int64_t> out(max_new);
      size_t n_out = 0;
      status = max_new == 0 || prompt.empty()
                   ? LOWRA_ERR_ARGUMENT
                   : lowra_model_generate(model, prompt.data(), prompt.size(), max_new, nullptr, 0, out.data(), &n_out);
      if (max_new == 0 || prompt.empty()) {
        std::printf("error %d usage: generate N ID [ID ...]\n", static_cast<int>(LOWRA_ERR_ARGUMENT));
      } else if (status != LOWRA_OK) {
        report_program_error(status);
      } else {
        std::printf("ok tokens");
        for (size_t i = 0; i < n_out; ++i) std::printf(" %lld", static_cast<long long>(out[i]));
        std::printf("\n");
      }
    } else if (command == "user") {
      std::printf("ok user %s\n", current.c_str());
    } else if (command == "quit") {
      break;
    } else if (!command.empty()) {
      std::printf("error %d unknown command '%s'; expected load FILE, unload, generate N IDS, user or quit\n",
                  static_cast<int>(LOWRA_ERR_ARGUMENT), command.c_str());
    }
    std::fflush(stdout);
  }
  lowra_model_close(model);
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options options;
  std::vector<std::string> args;
  if (!parse_options(argc, argv, options, args)) return 2;
  // The base or model shares the policy; the app's handle can go once it is handed over.
  struct TrustFree {
    lowra_trust* trust;
    ~TrustFree() { lowra_trust_free(trust); }
  } free_trust{options.trust};
#ifdef LOWRA_WITH_PROGRAM
  if ((args.size() == 1 || args.size() == 2) && is_model_folder(args[0]))
    return run_model(args[0], args.size() == 2 ? args[1] : "side", options);
#endif
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: %s [OPTIONS] BASE  (then commands on stdin: load FILE | unload | sum NAME | user | "
                         "quit)\n"
                         "       %s [OPTIONS] MODEL_FOLDER [side|merge]  (load FILE | unload | generate N IDS | user "
                         "| quit)\n"
                         "options: --key PUBLIC.pem (repeatable) --revocations FILE --user ID --decryption-key FILE\n",
                 argv[0], argv[0]);
    return 2;
  }
  lowra_base* base = nullptr;
  lowra_status status = lowra_base_open_trusted(args[0].c_str(), options.trust, &base);
  if (status != LOWRA_OK) {
    report_error(status);
    return 1;
  }
  std::printf("ok base %s tensors %zu\n", args[0].c_str(), lowra_tensor_count(base));
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
        status = lowra_user_load_signed(base, blob.data(), blob.size(), options.user_id(), options.key(),
                                        options.decryption_key.size(), &info);
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
