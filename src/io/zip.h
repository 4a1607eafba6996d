// zip.h — reader for the uncompressed ("stored") zip archives written by torch.save,
// including zip64 (archives or members over 4 GiB) and archives embedded at an offset
// inside a larger file (PyTorch DCP .distcp items). Only the central directory and local
// headers are read up front; member bytes are read on demand with pread, so an archive of
// any size costs a few kilobytes of memory. Compressed members are refused with an error.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "io/file.h"

namespace verl {

struct ZipEntry {
  std::string name;          // full name inside the archive, e.g. "archive/data/0"
  uint64_t data_offset = 0;  // absolute offset of the member's bytes in the underlying file
  uint64_t size = 0;         // member size in bytes
  uint32_t crc32 = 0;
};

class ZipReader {
 public:
  // Opens the archive occupying [base, base+length) of `file` (length 0: to the end).
  explicit ZipReader(std::shared_ptr<const File> file, uint64_t base = 0, uint64_t length = 0);
  explicit ZipReader(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(const std::string& name) const;  // exact name
  // The common top folder of a torch.save archive ("archive", "model_world_size_2_rank_0", ...):
  // the prefix of the entry ending in "/data.pkl".
  const std::string& torch_prefix() const;
  // Reads a whole member (for small records such as data.pkl); throws above max_bytes.
  std::string read(const ZipEntry& e, size_t max_bytes = 1u << 30) const;
  // Reads n bytes at offset `off` within the member into dst.
  void read_at(const ZipEntry& e, uint64_t off, void* dst, size_t n) const;
  const File& file() const { return *file_; }
  std::shared_ptr<const File> file_ptr() const { return file_; }

 private:
  std::shared_ptr<const File> file_;
  uint64_t base_ = 0, length_ = 0;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
  mutable std::string prefix_;
  void parse();
};

}  // namespace verl
