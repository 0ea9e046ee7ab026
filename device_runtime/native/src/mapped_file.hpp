// A whole file mapped read-only: the base file on disk stays the pristine copy and is never written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lowra {

class MappedFile {
 public:
  // Maps `path`; a missing file is LOWRA_ERR_BASE_NOT_FOUND with `missing` as the message.
  MappedFile(const std::string& path, const std::string& missing);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

enum class PathKind { Missing, File, Directory, Other };
PathKind path_kind(const std::string& path);

}  // namespace lowra
