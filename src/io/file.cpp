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

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}
Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

File::File(const std::string& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer. Only regular files are inputs.
  fd_ = Fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd_.get() < 0) fail(path, ": cannot open: ", err());
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) fail(path, ": cannot stat: ", err());  // fd_ is closed as a member
  if (S_ISDIR(st.st_mode)) fail(path, ": is a directory, expected a file");
  if (!S_ISREG(st.st_mode))
    fail(path, ": is not a regular file (", S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device"
                                             : S_ISBLK(st.st_mode) ? "a block device" : S_ISSOCK(st.st_mode) ? "a socket" : "special",
         "): refusing to read it");
  const int fl = ::fcntl(fd_.get(), F_GETFL);
  if (fl >= 0) ::fcntl(fd_.get(), F_SETFL, fl & ~O_NONBLOCK);
  size_ = static_cast<uint64_t>(st.st_size);
}

void File::read_at(void* dst, size_t n, uint64_t off) const {
  if (off > size_ || n > size_ - off)
    fail(path_, ": truncated: need bytes [", off, ", ", off + n, ") but the file has ", size_);
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd_.get(), p, n, static_cast<off_t>(off));
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
  data_ = std::unique_ptr<uint8_t, Unmap>(static_cast<uint8_t*>(p), Unmap{size_});
}
void MappedFile::Unmap::operator()(uint8_t* p) const { ::munmap(p, size); }
void MappedFile::release(uint64_t off, uint64_t n) const {
  if (!data_ || off >= size_) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t b = off / page * page;
  uint64_t e = std::min(size_, off + n);
  if (e > b) ::madvise(data_.get() + b, e - b, MADV_DONTNEED);
}

OutFile::OutFile(const std::string& path) : path_(path) {
  fd_ = Fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd_.get() < 0) fail(path, ": cannot create: ", err());
}
void OutFile::write(const void* src, size_t n) {
  auto* p = static_cast<const char*>(src);
  while (n > 0) {
    ssize_t r = ::write(fd_.get(), p, n);
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
  if (fd_.get() < 0) return;
  if (sync && ::fsync(fd_.get()) != 0) fail(path_, ": fsync failed: ", err());
  if (::close(fd_.release()) != 0) fail(path_, ": close failed: ", err());
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
