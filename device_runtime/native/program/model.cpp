// lowra_model (include/lowra_model.h): an exported ExecuTorch model folder with swappable users, natively.
//
// What the Python ExecutorchEngine does, in C++: the manifest (docs/FORMAT.md "ExecuTorch model folder") names the
// programs, their .ptd data templates and, per adaptable module, the base weight's digest and the byte range of each
// user tensor in the template. A user is a copy of the template with those ranges rewritten (side: the blob's
// factors zero-padded to the program's rank; merge: base + up @ down with liblowra's merge_into), handed to the
// program through a BufferDataLoader, so no file is written and the .pte is shared by every user. The program is
// loaded once; a user swap rewrites those ranges in the buffer it reads (see lowra_model::switch_user).
#include "lowra_model.h"

#include <dlfcn.h>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/module/module.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "../src/adapter.hpp"
#include "../src/error.hpp"
#include "../src/json.hpp"
#include "../src/mapped_file.hpp"
#include "../src/runtime.hpp"
#include "../src/sha256.hpp"
#include "../src/trust.hpp"
#include "program_internal.hpp"

namespace {

using executorch::extension::BufferDataLoader;
using executorch::extension::MmapDataLoader;
using executorch::extension::module::Module;
using lowra::fail;

constexpr const char* kFormat = "lowra-executorch";
constexpr int64_t kFormatVersion = 1;
constexpr size_t kMaxManifestBytes = 64u << 20;

struct TensorRange {
  std::string module, role;  // role: "down" / "up" (side) or "weight" (merge)
  uint64_t offset = 0, nbytes = 0;
  std::vector<int64_t> shape;
  bool half = false;  // float16 (a side program's factors, by default), else float32 (uint8 for *_codes roles)
};

// A side program's factors as 4-bit codes (roles down_codes / down_books / up_codes / up_books).
bool packed_role(const std::string& role) {
  return role == "down_codes" || role == "down_books" || role == "up_codes" || role == "up_books";
}

using PackedUsers = std::map<std::string, lowra::Packed4>;

struct ModuleInfo {
  std::vector<int64_t> shape;  // [out, in]
  std::string digest;          // "sha256:..." of the decoded float32 base weight
};

std::string read_text(const std::string& path, const std::string& what) {
  if (lowra::path_kind(path) != lowra::PathKind::File)
    fail(LOWRA_ERR_BASE_NOT_FOUND, what + " " + path + " does not exist; expected a folder written by "
                                                       "lowra.export.executorch.export_executorch");
  std::ifstream in(path, std::ios::binary);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  if (!in.good() && !in.eof()) fail(LOWRA_ERR_IO, "cannot read " + path);
  if (text.size() > kMaxManifestBytes) fail(LOWRA_ERR_PROGRAM, path + " is larger than any lowra manifest");
  return text;
}

const lowra::Json& member(const lowra::Json& object, const char* key, const std::string& where) {
  const lowra::Json* value = object.is_object() ? object.find(key) : nullptr;
  if (value == nullptr) fail(LOWRA_ERR_PROGRAM, where + " has no '" + key + "'; re-export the model folder");
  return *value;
}

std::string string_of(const lowra::Json& object, const char* key, const std::string& where) {
  const lowra::Json& value = member(object, key, where);
  if (!value.is_string()) fail(LOWRA_ERR_PROGRAM, where + ": '" + key + "' is " + value.type_name() + ", expected a string");
  return value.text;
}

int64_t int_of(const lowra::Json& object, const char* key, const std::string& where, int64_t low, int64_t high) {
  const lowra::Json& value = member(object, key, where);
  if (!value.int_in(low, high))
    fail(LOWRA_ERR_PROGRAM, where + ": '" + key + "' is " + value.brief() + ", expected an integer in [" +
                                std::to_string(low) + ", " + std::to_string(high) + "]");
  return value.integer;
}

std::vector<int64_t> shape_of(const lowra::Json& object, const std::string& where) {
  const lowra::Json& value = member(object, "shape", where);
  std::vector<int64_t> shape;
  if (value.is_array() && value.items.size() == 2)
    for (const auto& d : value.items)
      if (d.int_in(1, int64_t{1} << 31)) shape.push_back(d.integer);
  if (shape.size() != 2) fail(LOWRA_ERR_PROGRAM, where + ": shape is " + value.brief() + ", expected [rows, cols]");
  return shape;
}

// A file of the folder against the manifest's sha256 (hashed through a read-only mapping).
void verify_file(const std::string& path, const std::string& expected, const std::string& what) {
  lowra::MappedFile mapped(path, what + " " + path + " is missing; copy the whole model folder");
  lowra::Sha256 h;
  h.update(mapped.data(), mapped.size());
  if (h.hex() != expected)
    fail(LOWRA_ERR_CHECKSUM, what + " " + path + " does not match the manifest (sha256 " + h.hex().substr(0, 16) +
                                 "..., expected " + expected.substr(0, 16) + "...): the folder is corrupted or mixed "
                                 "from two exports; copy it again or re-export");
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

template <typename F>
lowra_status guarded(F&& body) {
  try {
    body();
    return lowra_program_detail::ok();
  } catch (const lowra::Error& e) {
    return lowra_program_detail::fail(e.status(), e.what());
  } catch (const std::bad_alloc&) {
    return lowra_program_detail::fail(LOWRA_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return lowra_program_detail::fail(LOWRA_ERR_INTERNAL, std::string("internal error: ") + e.what());
  }
}

struct UserState {
  std::string adapter_id, base_fingerprint;
  size_t n_modules = 0, file_bytes = 0;
  double effective_bits = 0, load_ms = 0, apply_ms = 0;
};

}  // namespace

struct lowra_model {
  std::string folder, mode, program_path;
  int64_t max_seq_len = 0, rank = 0, vocab_size = 0;
  bool logits_last = false;  // the programs output the last position's logits only (manifest "logits": "last")
  std::map<std::string, ModuleInfo> modules;
  std::vector<TensorRange> ranges;
  std::unique_ptr<lowra::MappedFile> tmpl;  // the pristine data template, never written
  // The active program and the data it reads (kept alive together; replaced together on a swap).
  std::vector<uint8_t> data;
  std::unique_ptr<Module> module;
  std::unique_ptr<UserState> user;
  // The app's trust policy for users' blobs (lowra_model_set_trust); the default pins no key.
  std::shared_ptr<lowra::TrustPolicy> trust = std::make_shared<lowra::TrustPolicy>();

  // A copy of the template with the user's tensors written (module -> decoded factors; empty = the base).
  std::vector<uint8_t> compose(const std::map<std::string, lowra::Factors>& factors = {},
                               const PackedUsers& packed = {}) const {
    std::vector<uint8_t> out(tmpl->data(), tmpl->data() + tmpl->size());
    write_user(out.data(), factors, packed);
    return out;
  }

  // Whether the side program keeps users' factors as 4-bit codes (then a load packs the blob's channels).
  bool packed_factors() const {
    return std::any_of(ranges.begin(), ranges.end(), [](const TensorRange& r) { return packed_role(r.role); });
  }

  // Write every user tensor range of `out` (a buffer laid out like the template): side, the factors zero-padded to
  // the program's rank (zeros = the base); merge, the pristine base weight plus up @ down (the pristine weight for
  // modules the user does not adapt). Every range is written, so the result does not depend on what `out` held.
  void write_user(uint8_t* out, const std::map<std::string, lowra::Factors>& factors, const PackedUsers& packed) const {
    if (mode == "merge") return merge_user(out, factors);
    for (const TensorRange& r : ranges) {
      if (packed_role(r.role)) {  // the codes / books as packed (zeros for a module the user does not adapt)
        std::memset(out + r.offset, 0, r.nbytes);
        auto p = packed.find(r.module);
        if (p == packed.end()) continue;
        const void* source = r.role == "down_codes" ? static_cast<const void*>(p->second.down_codes.data())
                             : r.role == "up_codes" ? static_cast<const void*>(p->second.up_codes.data())
                             : r.role == "down_books" ? static_cast<const void*>(p->second.down_books.data())
                                                      : static_cast<const void*>(p->second.up_books.data());
        std::memcpy(out + r.offset, source, r.nbytes);
        continue;
      }
      auto it = factors.find(r.module);
      const lowra::Factors* f = it == factors.end() ? nullptr : &it->second;
      const int64_t rows = r.shape[0], cols = r.shape[1];
      std::memset(out + r.offset, 0, r.nbytes);  // zeros in both dtypes
      if (f == nullptr || f->kept == 0) continue;
      // Rows [0, kept) of down, or columns [0, kept) of up, from the factors: float32 copied, float16 rounded (exact
      // for a blob's values, which are float16 levels).
      auto put = [&](uint64_t element, const float* values, size_t count) {
        if (r.half) {
          lowra::floats_to_halves(values, count, reinterpret_cast<uint16_t*>(out + r.offset) + element);
        } else {
          std::memcpy(reinterpret_cast<float*>(out + r.offset) + element, values, 4 * count);
        }
      };
      if (r.role == "down") {  // [rank, in] <- down [kept, in]: one block
        put(0, f->down.data(), f->down.size());
      } else if (f->kept == cols) {  // [out, rank] <- up [out, rank]: one block
        put(0, f->up.data(), f->up.size());
      } else {  // [out, rank] <- up [out, kept], row by row
        for (int64_t row = 0; row < rows; ++row)
          put(static_cast<uint64_t>(row * cols), f->up.data() + row * f->kept, static_cast<size_t>(f->kept));
      }
    }
  }

  // Merge mode: every weight range = pristine + up @ down (or the pristine weight), the ranges split over threads
  // (each range is written by one thread, in one fixed way, so the result does not depend on the split).
  void merge_user(uint8_t* out, const std::map<std::string, lowra::Factors>& factors) const {
    auto merge_range = [&](const TensorRange& r) {
      float* target = reinterpret_cast<float*>(out + r.offset);
      const float* pristine = reinterpret_cast<const float*>(tmpl->data() + r.offset);
      auto it = factors.find(r.module);
      if (it != factors.end()) {
        lowra::merge_into(target, pristine, it->second.up.data(), it->second.down.data(), r.shape[0], it->second.kept,
                          r.shape[1]);
      } else {
        std::copy(pristine, pristine + r.shape[0] * r.shape[1], target);
      }
    };
    const size_t n_threads = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), 8));
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i = next++; i < ranges.size(); i = next++) merge_range(ranges[i]);
    };
    std::vector<std::thread> helpers;
    for (size_t t = 1; t < n_threads; ++t) {
      try {
        helpers.emplace_back(work);
      } catch (const std::system_error&) {
        break;  // no more threads: this one does the rest
      }
    }
    work();
    for (auto& h : helpers) h.join();
  }

  // A user swap. ExecuTorch reads the program's external data through the BufferDataLoader without copying it (its
  // constant tensors point into `data`), so rewriting the user's ranges in place is the whole swap: no program
  // reload, no second copy of the data. The caller has verified and decoded the user first, so this cannot fail.
  void switch_user(const std::map<std::string, lowra::Factors>& factors, const PackedUsers& packed) {
    write_user(data.data(), factors, packed);
  }

  // Load the program over `next` and make both active; on failure nothing changes.
  void activate(std::vector<uint8_t> next) {
    auto loader = MmapDataLoader::from(program_path.c_str());
    if (!loader.ok()) fail(LOWRA_ERR_PROGRAM, "cannot map the program " + program_path);
    auto program_loader = std::make_unique<MmapDataLoader>(std::move(loader.get()));
    auto data_loader = std::make_unique<BufferDataLoader>(next.data(), next.size());
    auto fresh = std::make_unique<Module>(std::move(program_loader), nullptr, nullptr, nullptr, std::move(data_loader));
    const lowra_status status = lowra_program_detail::load_forward(*fresh, program_path);
    if (status != LOWRA_OK) throw lowra::Error(status, lowra_program_detail::last_error());
    module.reset();  // the old program reads the old data: drop it first
    module = std::move(fresh);
    data = std::move(next);  // the vector's heap buffer (what the loader points at) moves with it
  }
};

namespace {

void read_manifest(lowra_model& m, bool verify) {
  const std::string path = m.folder + "/manifest.json";
  lowra::Json manifest;
  std::string error;
  if (!lowra::parse_json(read_text(path, "manifest"), manifest, error))
    fail(LOWRA_ERR_PROGRAM, path + " is not valid JSON (" + error + "); re-export the model");
  if (!manifest.is_object()) fail(LOWRA_ERR_PROGRAM, path + " is not a JSON object; re-export the model");
  const lowra::Json* format = manifest.find("format");
  const lowra::Json* version = manifest.find("format_version");
  if (format == nullptr || !format->is_string() || format->text != kFormat || version == nullptr ||
      !version->int_in(kFormatVersion, kFormatVersion))
    fail(LOWRA_ERR_UNSUPPORTED_FORMAT, path + ": format " + (format ? format->brief() : "missing") + " version " +
                                           (version ? version->brief() : "missing") + "; this runtime reads '" +
                                           kFormat + "' version 1. Re-export the model or upgrade lowra");
  m.max_seq_len = int_of(manifest, "max_seq_len", path, 2, 1 << 20);
  m.rank = int_of(manifest, "rank", path, 1, 1 << 16);
  m.vocab_size = int_of(manifest, "vocab_size", path, 1, 1 << 24);
  if (manifest.find("logits") != nullptr) {  // absent in folders written before it: every position's logits
    const std::string logits = string_of(manifest, "logits", path);
    if (logits != "last" && logits != "all")
      fail(LOWRA_ERR_PROGRAM, path + ": 'logits' is '" + logits + "'; expected 'last' or 'all'");
    m.logits_last = logits == "last";
  }
  const lowra::Json& modules = member(manifest, "modules", path);
  if (!modules.is_object()) fail(LOWRA_ERR_PROGRAM, path + ": 'modules' is not an object");
  for (const auto& [name, entry] : modules.members)
    m.modules[name] = ModuleInfo{shape_of(entry, path + " module " + name), string_of(entry, "digest", path)};

  // Kernels for custom-op programs: loaded once per process, into the runtime the programs run on.
  const std::string ops = string_of(manifest, "ops", path);
  if (ops == "custom") {
    const std::string library = m.folder + "/" + string_of(manifest, "kernel_library", path);
    if (verify) verify_file(library, string_of(manifest, "kernel_library_sha256", path), "kernel library");
    // The operators the programs call (manifest "kernel_ops"; folders written before the list call these two).
    std::vector<std::string> required = {"lowra::lowbit_linear.out", "lowra::dequantize.out"};
    if (const lowra::Json* listed = manifest.find("kernel_ops")) {
      if (!listed->is_array()) fail(LOWRA_ERR_PROGRAM, path + ": 'kernel_ops' is not a list");
      required.clear();
      for (const auto& op : listed->items) {
        if (!op.is_string()) fail(LOWRA_ERR_PROGRAM, path + ": 'kernel_ops' holds " + op.brief() + ", not a name");
        required.push_back(op.text);
      }
    }
    auto missing = [&] {
      for (const auto& op : required)
        if (!lowra_program_detail::has_operator(op.c_str())) return op;
      return std::string();
    };
    if (!missing().empty()) {
      if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)  // never closed: kernels stay registered
        fail(LOWRA_ERR_KERNEL, "cannot load the kernel library " + library + ": " + dlerror());
      const std::string absent = missing();
      if (!absent.empty())
        fail(LOWRA_ERR_KERNEL, library + " loaded but registers no " + absent + "; rebuild it (or re-export the "
                                                                                "folder with this lowra)");
    }
  } else if (ops != "aten") {
    fail(LOWRA_ERR_PROGRAM, path + ": ops is '" + ops + "', expected 'custom' or 'aten'");
  }

  const lowra::Json& programs = member(manifest, "programs", path);
  const lowra::Json* program = programs.is_object() ? programs.find(m.mode) : nullptr;
  if (program == nullptr)
    fail(LOWRA_ERR_PROGRAM, m.folder + " has no '" + m.mode + "' program; re-export with that mode");
  const std::string where = path + " programs." + m.mode;
  m.program_path = m.folder + "/" + string_of(*program, "program", where);
  const std::string data_path = m.folder + "/" + string_of(*program, "data", where);
  if (verify) {
    verify_file(m.program_path, string_of(*program, "program_sha256", where), m.mode + " program");
    verify_file(data_path, string_of(*program, "data_sha256", where), m.mode + " data template");
  }
  m.tmpl = std::make_unique<lowra::MappedFile>(data_path, "data template " + data_path + " is missing");
  const lowra::Json& tensors = member(*program, "tensors", where);
  if (!tensors.is_object()) fail(LOWRA_ERR_PROGRAM, where + ": 'tensors' is not an object");
  for (const auto& [key, entry] : tensors.members) {
    const size_t colon = key.rfind(':');
    TensorRange r;
    r.module = key.substr(0, colon == std::string::npos ? 0 : colon);
    r.role = colon == std::string::npos ? "" : key.substr(colon + 1);
    r.shape = shape_of(entry, where + " tensor " + key);
    r.offset = static_cast<uint64_t>(int_of(entry, "offset", where, 0, int64_t{1} << 50));
    r.nbytes = static_cast<uint64_t>(int_of(entry, "nbytes", where, 0, int64_t{1} << 50));
    auto module = m.modules.find(r.module);
    const bool side = m.mode == "side";
    const std::string dtype = string_of(entry, "dtype", where + " tensor " + key);
    const bool codes = r.role == "down_codes" || r.role == "up_codes", books = r.role == "down_books" ||
                                                                               r.role == "up_books";
    const bool dtype_ok = codes ? dtype == "uint8" : books ? dtype == "float16"
                                                           : dtype == "float32" || (side && dtype == "float16");
    if (!dtype_ok)
      fail(LOWRA_ERR_PROGRAM, where + ": tensor " + key + " is '" + dtype + "'; expected uint8 codes, float16 books, "
                                  "float16 or float32 factors (side) or float32 weights (merge). Re-export the folder");
    r.half = dtype == "float16";
    const uint64_t elem = codes ? 1 : r.half ? 2 : 4;
    const bool role_ok = side ? (r.role == "down" || r.role == "up" || codes || books) : r.role == "weight";
    if (module == m.modules.end() || !role_ok)
      fail(LOWRA_ERR_PROGRAM, where + ": tensor " + key + " names no adaptable module and role of this mode");
    const auto& base = module->second.shape;
    const std::vector<int64_t> want = !side                 ? base
                                      : r.role == "down"      ? std::vector<int64_t>{m.rank, base[1]}
                                      : r.role == "up"        ? std::vector<int64_t>{base[0], m.rank}
                                      : r.role == "down_codes" ? std::vector<int64_t>{m.rank, (base[1] + 1) / 2}
                                      : r.role == "up_codes"   ? std::vector<int64_t>{m.rank, (base[0] + 1) / 2}
                                                               : std::vector<int64_t>{m.rank, 16};
    if (r.shape != want || r.nbytes != elem * static_cast<uint64_t>(want[0] * want[1]) || r.offset % elem != 0 ||
        r.offset + r.nbytes > m.tmpl->size())
      fail(LOWRA_ERR_PROGRAM, where + ": tensor " + key + " (" + lowra::shape_text(r.shape) + ", bytes " +
                                  std::to_string(r.offset) + "+" + std::to_string(r.nbytes) + ") does not fit the " +
                                  std::to_string(m.tmpl->size()) + "-byte data template or the base shape " +
                                  lowra::shape_text(want) + "; re-export or copy the folder again");
    m.ranges.push_back(std::move(r));
  }
}

}  // namespace

extern "C" {

lowra_status lowra_model_open(const char* folder, const char* mode, int verify, lowra_model** out) {
  if (out == nullptr || folder == nullptr || mode == nullptr)
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_open: folder, mode and out must not be null");
  *out = nullptr;
  const std::string mode_text = mode;
  if (mode_text != "side" && mode_text != "merge")
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "mode '" + mode_text + "' is unknown; expected 'side' or "
                                                          "'merge'");
  return guarded([&] {
    auto model = std::make_unique<lowra_model>();
    model->folder = folder;
    model->mode = mode_text;
    read_manifest(*model, verify != 0);
    model->activate(model->compose());
    // Side mode never reads the template again (a swap writes zeros and factors), so its pages can go.
    if (model->mode == "side") model->tmpl.reset();
    *out = model.release();
  });
}

void lowra_model_close(lowra_model* model) { delete model; }

lowra_status lowra_model_set_trust(lowra_model* model, lowra_trust* trust) {
  if (model == nullptr || trust == nullptr)
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_set_trust: model and trust must not be null");
  model->trust = trust->policy;
  return lowra_program_detail::ok();
}

lowra_status lowra_model_user_load(lowra_model* model, const uint8_t* blob, size_t blob_size, lowra_user_info* info) {
  return lowra_model_user_load_signed(model, blob, blob_size, nullptr, nullptr, 0, info);
}

lowra_status lowra_model_user_load_signed(lowra_model* model, const uint8_t* blob, size_t blob_size,
                                          const char* user_id, const uint8_t* decryption_key, size_t key_size,
                                          lowra_user_info* info) {
  if (model == nullptr || blob == nullptr)
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_user_load: model and blob must not be null");
  return guarded([&] {
    const auto start = std::chrono::steady_clock::now();
    const std::string user_text = user_id ? user_id : "";
    lowra::LoadOptions options;
    options.user_id = user_id ? &user_text : nullptr;
    options.decryption_key = decryption_key;
    options.decryption_key_size = decryption_key ? key_size : 0;
    lowra::Json claims;
    lowra::Blob parsed = lowra::open_blob(*model->trust, blob, blob_size, options, &claims);
    const auto shape_lookup = [model](const std::string& name) -> const std::vector<int64_t>* {
      auto it = model->modules.find(name);
      return it == model->modules.end() ? nullptr : &it->second.shape;
    };
    const auto digest_lookup = [model](const std::string& name) { return model->modules.at(name).digest; };
    lowra::check_base_binding(parsed, "the program at " + model->folder, shape_lookup, digest_lookup);
    // A program cannot prove its base's content (ExecutorchEngine: check_base_content(parsed, None, ...)).
    lowra::check_base_content(parsed, &claims, nullptr, "the program at " + model->folder);
    // A program holding packed factors takes the blob's codes (pack_factors4 below); decoding them to float32 would
    // only cost time, so its factors carry the kept count alone.
    const bool packed_program = model->mode == "side" && model->packed_factors();
    std::map<std::string, lowra::Factors> factors;
    for (size_t i = 0; i < parsed.modules.size(); ++i) {
      lowra::Factors& f = factors[parsed.modules[i].name];
      f = packed_program ? lowra::Factors{lowra::kept_components(parsed, i), {}, {}} : lowra::decode_factors(parsed, i);
      const int64_t kept = f.kept;
      if (model->mode == "side" && kept > model->rank)
        fail(LOWRA_ERR_CONTENT, "adapter '" + parsed.adapter_id + "' keeps " + std::to_string(kept) +
                                    " components in " + parsed.modules[i].name + "; the side-branch program has "
                                    "rank " + std::to_string(model->rank) + ". Use mode 'merge' or export with "
                                    "rank >= " + std::to_string(kept));
    }
    PackedUsers packed;
    if (packed_program) {
      for (size_t i = 0; i < parsed.modules.size(); ++i)
        packed[parsed.modules[i].name] = lowra::pack_factors4(parsed, i, model->rank);
    }
    const auto apply = std::chrono::steady_clock::now();
    model->switch_user(factors, packed);
    auto user = std::make_unique<UserState>();
    user->adapter_id = parsed.adapter_id;
    user->base_fingerprint = parsed.base_fingerprint;
    user->n_modules = parsed.modules.size();
    user->file_bytes = parsed.file_bytes;
    user->effective_bits = 8.0 * static_cast<double>(parsed.file_bytes) /
                           static_cast<double>(std::max<int64_t>(parsed.n_params, 1));
    user->apply_ms = ms_since(apply);
    user->load_ms = ms_since(start);
    model->user = std::move(user);
    if (info != nullptr) {
      const UserState& u = *model->user;
      *info = lowra_user_info{u.adapter_id.c_str(), u.base_fingerprint.c_str(), u.n_modules, u.file_bytes,
                              u.effective_bits, u.load_ms, u.apply_ms};
    }
  });
}

lowra_status lowra_model_user_unload(lowra_model* model) {
  if (model == nullptr) return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_user_unload: null model");
  return guarded([&] {
    model->switch_user({}, {});
    model->user.reset();
  });
}

lowra_status lowra_model_forward(lowra_model* model, const int64_t* ids, size_t n, int64_t start, float* logits,
                                 size_t capacity, size_t* vocab) {
  if (model == nullptr) return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_forward: null model");
  if (start + static_cast<int64_t>(n) > model->max_seq_len)
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, std::to_string(n) + " tokens at position " +
                                                              std::to_string(start) + " pass the program's " +
                                                              std::to_string(model->max_seq_len) + " positions");
  try {
    return lowra_program_detail::forward(*model->module, ids, n, start, logits, capacity, vocab);
  } catch (const std::exception& e) {
    return lowra_program_detail::fail(LOWRA_ERR_INTERNAL, std::string("internal error: ") + e.what());
  }
}

lowra_status lowra_model_generate(lowra_model* model, const int64_t* prompt, size_t n, size_t max_new,
                                  const int64_t* stop, size_t n_stop, int64_t* out, size_t* n_out) {
  if (model == nullptr || prompt == nullptr || out == nullptr || n_out == nullptr || n == 0 || max_new == 0 ||
      (stop == nullptr && n_stop != 0))
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "lowra_model_generate: null argument, empty prompt or "
                                                          "max_new 0");
  *n_out = 0;
  if (n >= static_cast<size_t>(model->max_seq_len))
    return lowra_program_detail::fail(LOWRA_ERR_ARGUMENT, "prompt of " + std::to_string(n) + " tokens does not fit "
                                                          "the program's " + std::to_string(model->max_seq_len) +
                                                          " positions");
  const size_t budget = std::min(max_new, static_cast<size_t>(model->max_seq_len) - n);
  std::vector<float> logits(n * static_cast<size_t>(model->vocab_size));
  size_t vocab = 0;
  auto argmax_row = [&](size_t row) {
    const float* r = logits.data() + row * vocab;
    return static_cast<int64_t>(std::max_element(r, r + vocab) - r);
  };
  lowra_status status = lowra_model_forward(model, prompt, n, 0, logits.data(), logits.size(), &vocab);
  if (status != LOWRA_OK) return status;
  int64_t token = argmax_row(model->logits_last ? 0 : n - 1);
  int64_t position = static_cast<int64_t>(n);
  while (std::find(stop, stop + n_stop, token) == stop + n_stop) {
    out[(*n_out)++] = token;
    if (*n_out >= budget) break;
    status = lowra_model_forward(model, &token, 1, position, logits.data(), logits.size(), &vocab);
    if (status != LOWRA_OK) return status;
    token = argmax_row(0);
    ++position;
  }
  return lowra_program_detail::ok();
}

size_t lowra_model_vocab_size(const lowra_model* model) { return model ? static_cast<size_t>(model->vocab_size) : 0; }
size_t lowra_model_max_seq_len(const lowra_model* model) { return model ? static_cast<size_t>(model->max_seq_len) : 0; }

}  // extern "C"
