// file.cpp — pread / mmap / append implementations (see file.h).
#include "io/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "core/error.h"

namespace verl {

namespace {
std::string err() { return std::strerror(errno); }
}  // namespace

File::File(const std::string& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer. Only regular files are inputs.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) fail(path, ": cannot open: ", err());
  struct stat st {};
  const bool ok = ::fstat(fd_, &st) == 0;
  const std::string e = ok ? "" : err();
  if (!ok || !S_ISREG(st.st_mode)) ::close(std::exchange(fd_, -1));  // the destructor will not run
  if (!ok) fail(path, ": cannot stat: ", e);
  if (S_ISDIR(st.st_mode)) fail(path, ": is a directory, expected a file");
  if (!S_ISREG(st.st_mode))
    fail(path, ": is not a regular file (", S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device"
                                             : S_ISBLK(st.st_mode) ? "a block device" : S_ISSOCK(st.st_mode) ? "a socket" : "special",
         "): refusing to read it");
  const int fl = ::fcntl(fd_, F_GETFL);
  if (fl >= 0) ::fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK);
  size_ = static_cast<uint64_t>(st.st_size);
}
File::~File() {
  if (fd_ >= 0) ::close(fd_);
}
File::File(File&& o) noexcept
    : path_(std::move(o.path_)), fd_(std::exchange(o.fd_, -1)), size_(o.size_) {}
File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(o.path_);
    fd_ = std::exchange(o.fd_, -1);
    size_ = o.size_;
  }
  return *this;
}

void File::read_at(void* dst, size_t n, uint64_t off) const {
  if (off > size_ || n > size_ - off)
    fail(path_, ": truncated: need bytes [", off, ", ", off + n, ") but the file has ", size_);
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd_, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(path_, ": read error at offset ", off, ": ", err());
    }
    if (r == 0) fail(path_, ": unexpected end of file at offset ", off);
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

std::string File::read_string(size_t n, uint64_t off) const {
  std::string s(n, '\0');
  read_at(s.data(), n, off);
  return s;
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  File f(path);
  size_ = f.size();
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, f.fd(), 0);
  if (p == MAP_FAILED) fail(path, ": cannot map: ", err());
  data_ = static_cast<uint8_t*>(p);
}
MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}
MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(o.size_) {}
MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(data_, size_);
    path_ = std::move(o.path_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = o.size_;
  }
  return *this;
}
void MappedFile::release(uint64_t off, uint64_t n) const {
  if (!data_ || off >= size_) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t b = off / page * page;
  uint64_t e = std::min(size_, off + n);
  if (e > b) ::madvise(data_ + b, e - b, MADV_DONTNEED);
}

OutFile::OutFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path, ": cannot create: ", err());
}
OutFile::~OutFile() {
  if (fd_ >= 0) ::close(fd_);
}
void OutFile::write(const void* src, size_t n) {
  auto* p = static_cast<const char*>(src);
  while (n > 0) {
    ssize_t r = ::write(fd_, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(path_, ": write error: ", err());
    }
    p += r;
    n -= static_cast<size_t>(r);
    written_ += static_cast<uint64_t>(r);
  }
}
void OutFile::close(bool sync) {
  if (fd_ < 0) return;
  if (sync && ::fsync(fd_) != 0) fail(path_, ": fsync failed: ", err());
  int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) fail(path_, ": close failed: ", err());
}

std::string read_text_file(const std::string& path, size_t max_bytes) {
  File f(path);
  if (f.size() > max_bytes) fail(path, ": too large (", f.size(), " bytes, limit ", max_bytes, ")");
  return f.read_string(static_cast<size_t>(f.size()), 0);
}
void write_text_file(const std::string& path, const std::string& text) {
  OutFile o(path);
  o.write(text.data(), text.size());
  o.close();
}

}  // namespace verl
