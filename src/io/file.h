// file.h — read-only files accessed by explicit offset (pread) or by memory map, and a
// writer that appends. pread keeps resident memory bounded: bytes go into a caller's
// reused buffer and nothing stays mapped. Every short read names the file and the range.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace verl {

// An owned file descriptor (-1: none), closed once; moving transfers it. The handles below
// hold their OS resources in such members, so they are movable and not copyable by default.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd();
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

class File {
 public:
  File() = default;
  explicit File(const std::string& path);  // opens read-only; throws Error naming the path

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  // Reads exactly n bytes at off into dst (thread-safe); throws if the file is shorter.
  void read_at(void* dst, size_t n, uint64_t off) const;
  std::string read_string(size_t n, uint64_t off) const;
  int fd() const { return fd_.get(); }

 private:
  std::string path_;
  Fd fd_;
  uint64_t size_ = 0;
};

// A whole file mapped read-only.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);

  const std::string& path() const { return path_; }
  const uint8_t* data() const { return data_.get(); }
  uint64_t size() const { return size_; }
  // Drop the pages of [off, off+n) from this process's resident set.
  void release(uint64_t off, uint64_t n) const;

 private:
  struct Unmap {
    uint64_t size;  // bytes mapped
    void operator()(uint8_t* p) const;
  };
  std::string path_;
  std::unique_ptr<uint8_t, Unmap> data_;
  uint64_t size_ = 0;
};

// Sequential writer; write() retries partial writes and reports errors with the path.
class OutFile {
 public:
  explicit OutFile(const std::string& path);  // creates / truncates
  void write(const void* src, size_t n);
  uint64_t written() const { return written_; }
  void close(bool sync = false);  // flushes; throws on error
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  Fd fd_;
  uint64_t written_ = 0;
};

// Small helpers for whole-file text.
std::string read_text_file(const std::string& path, size_t max_bytes = 64u << 20);
void write_text_file(const std::string& path, const std::string& text);

}  // namespace verl
