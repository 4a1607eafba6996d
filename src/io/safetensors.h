// safetensors.h — strict reader (memory-mapped) and streaming writer of the safetensors
// format: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces
// to a multiple of 8 when written), then the raw little-endian tensor bytes. Offsets in the
// header are relative to the end of the header. The reader validates before any use: header
// size cap, valid JSON of the expected shape, known dtypes, byte length = numel × dtype
// size, offsets inside the file and tiling the data area contiguously without gaps/overlaps.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/file.h"

namespace verl {

struct StTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data area
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

class SafetensorsReader {
 public:
  static constexpr uint64_t kMaxHeader = 100u << 20;  // 100 MB, as the reference reader
  explicit SafetensorsReader(const std::string& path);  // throws Error naming file + key

  const std::string& path() const { return file_.path(); }
  const std::vector<StTensor>& tensors() const { return tensors_; }  // sorted by name
  const StTensor* find(const std::string& name) const;
  const StTensor& at(const std::string& name) const;  // throws naming the missing key
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Pointer to the tensor's bytes in the mapping (valid while the reader lives).
  const uint8_t* data(const StTensor& t) const { return file_.data() + data_start_ + t.begin; }
  uint64_t data_start() const { return data_start_; }
  void release(const StTensor& t) const { file_.release(data_start_ + t.begin, t.nbytes()); }
  // The same for bytes [off, off + n) of the tensor.
  void release_range(const StTensor& t, uint64_t off, uint64_t n) const { file_.release(data_start_ + t.begin + off, n); }

 private:
  MappedFile file_;
  uint64_t data_start_ = 0;
  std::vector<StTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Parse and validate a header held in memory (used by the reader and by the fuzzer).
// `data_size` is the size of the data area that follows the header (file size - 8 - N).
void parse_safetensors_header(const std::string& json, uint64_t data_size, const std::string& where,
                              std::vector<StTensor>* tensors,
                              std::map<std::string, std::string>* metadata);

struct StSpec {  // what the writer needs to know about a tensor up front
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

// Writes a file whose header lists `specs` in the given data order. After construction the
// caller appends each tensor's bytes in that order (in as many write() calls as it likes);
// finish() checks that every byte arrived and closes the file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<StSpec>& specs,
                    const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
  void write(const void* bytes, size_t n);
  void finish(bool sync = false);
  uint64_t data_bytes() const { return total_; }
  // Total file size a set of specs produces (header + data).
  static uint64_t file_size(const std::vector<StSpec>& specs,
                            const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

 private:
  OutFile out_;
  uint64_t total_ = 0, written_ = 0;
};

}  // namespace verl
