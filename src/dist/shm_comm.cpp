// shm_comm.cpp — collectives through a shared-memory segment (see shm_comm.h).
//
// Segment: [header][pid per rank][control lines per rank][slot per rank]. A collective is a
// sequence of rounds; round g of every rank:
//   1. wait until every rank's `done` >= g-1 (nobody still reads round g-1 from my slot),
//   2. copy my part into my slot, then `arrive` = g (release),
//   3. wait until every rank's `arrive` >= g (acquire), read the others' slots,
//   4. `done` = g.
// Every rank calls the same collectives in the same order (the Comm contract), so the round
// numbers agree without any exchange.
#include "dist/shm_comm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dist/comm_impl.h"
#include "core/error.h"

namespace verl {
namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory counters need lock-free 64-bit atomics");

constexpr uint64_t kMagic = 0x31686d7370636c76ULL;  // "vlcpshm1"
constexpr size_t kPage = 4096;
constexpr size_t kMsg = 128;  // a leader's message: ok flag + segment name
constexpr size_t kDefaultSlot = size_t(8) << 20;

struct alignas(64) Ctl {
  std::atomic<uint64_t> arrive;
  char pad0[56];
  std::atomic<uint64_t> done;
  char pad1[56];
};

struct Header {
  uint64_t magic, n, slot;
};

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
size_t pids_offset() { return 64; }
size_t ctl_offset(int n) { return round_up(pids_offset() + 8 * static_cast<size_t>(n), 64); }
size_t data_offset(int n) { return round_up(ctl_offset(n) + sizeof(Ctl) * static_cast<size_t>(n), kPage); }
size_t segment_bytes(int n, size_t slot) { return data_offset(n) + slot * static_cast<size_t>(n); }

struct Mapping {
  char* base = nullptr;
  size_t bytes = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept : base(o.base), bytes(o.bytes) { o.base = nullptr; }
  ~Mapping() {
    if (base) ::munmap(base, bytes);
  }
};

// The per-rank slot size: VERLCPP_SHM_SLOT_BYTES, else 8 MiB, at most a quarter of what
// /dev/shm has free split over the ranks; 0 when even 4 KiB per rank does not fit.
size_t slot_bytes(int n) {
  size_t want = kDefaultSlot;
  if (const char* s = std::getenv("VERLCPP_SHM_SLOT_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (!end || *end || v < 64 * n) fail("VERLCPP_SHM_SLOT_BYTES='", s, "': expected an integer >= ", 64 * n, " (bytes per rank)");
    want = static_cast<size_t>(v);
  }
  struct statvfs st {};
  if (::statvfs("/dev/shm", &st) == 0) {
    const size_t avail = static_cast<size_t>(st.f_bavail) * st.f_frsize;
    want = std::min(want, avail / 4 / static_cast<size_t>(n));
  }
  want = want / 64 * 64;
  return want < 64 * static_cast<size_t>(n) ? 0 : want;  // a round holds at least 8 bytes per rank
}

std::string host_identity() {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  std::string id = host;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  std::getline(f, boot);
  return id + "/" + boot;
}

// Makes (leader) or maps (the others) the segment of each group: every rank of `boot` calls
// this; `leader` is the boot rank that creates this rank's group's segment, `index` this
// rank's place in the group of `n`. Null on every rank when any rank could not map its
// segment (the caller then falls back). Segments are unlinked before this returns.
Mapping join(Comm& boot, int leader, int index, int n, size_t slot) {
  static std::atomic<uint64_t> counter{0};
  const bool lead = boot.rank() == leader;
  const size_t bytes = segment_bytes(n, slot);
  std::vector<char> msg(kMsg, 0);
  Mapping m;
  std::string name;
  auto map_fd = [&](int fd) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) return false;
    m.base = static_cast<char*>(p);
    m.bytes = bytes;
    return true;
  };
  if (lead && slot > 0) {
    std::random_device rd;
    name = "/verlcpp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" + std::to_string(rd());
    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    bool ok = fd >= 0;
    if (ok && (::ftruncate(fd, static_cast<off_t>(bytes)) != 0 || ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)) != 0)) {
      ::close(fd);
      ok = false;
    } else if (ok) {
      ok = map_fd(fd);
    }
    if (ok) {
      auto* h = reinterpret_cast<Header*>(m.base);
      h->magic = kMagic;
      h->n = static_cast<uint64_t>(n);
      h->slot = slot;
      msg[0] = 1;
      std::memcpy(&msg[1], name.c_str(), std::min(name.size(), kMsg - 2));
    }
    if (fd < 0) name.clear();  // nothing was made: nothing to unlink
  }
  std::vector<char> all(kMsg * static_cast<size_t>(boot.size()));
  boot.all_gather(msg.data(), all.data(), kMsg, DType::U8);
  const char* lm = &all[kMsg * static_cast<size_t>(leader)];
  int32_t ok = lm[0] == 1 ? 1 : 0;
  if (ok && !lead) {
    const std::string lname(lm + 1);
    const int fd = ::shm_open(lname.c_str(), O_RDWR, 0);
    struct stat st {};
    ok = fd >= 0 && ::fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) == bytes;
    if (ok) ok = map_fd(fd);
    else if (fd >= 0) ::close(fd);
    if (ok) {
      const auto* h = reinterpret_cast<const Header*>(m.base);
      ok = h->magic == kMagic && h->n == static_cast<uint64_t>(n) && h->slot == slot;
    }
  }
  if (ok) reinterpret_cast<int64_t*>(m.base + pids_offset())[index] = static_cast<int64_t>(::getpid());
  boot.all_reduce(&ok, 1, DType::I32, ReduceOp::Min);  // after this, every rank has mapped (or none uses it)
  if (lead && !name.empty()) ::shm_unlink(name.c_str());
  if (!ok) return Mapping();
  return m;
}

template <class T, ReduceOp OP>
void combine_t(void* out, const void* in, size_t n) {
  T* o = static_cast<T*>(out);
  const T* a = static_cast<const T*>(in);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (OP == ReduceOp::Max) o[i] = a[i] > o[i] || a[i] != a[i] ? a[i] : o[i];
    else if constexpr (OP == ReduceOp::Min) o[i] = a[i] < o[i] || a[i] != a[i] ? a[i] : o[i];
    else o[i] = o[i] + a[i];
  }
}

template <class T>
void combine_op(void* out, const void* in, size_t n, ReduceOp op) {
  if (op == ReduceOp::Max) combine_t<T, ReduceOp::Max>(out, in, n);
  else if (op == ReduceOp::Min) combine_t<T, ReduceOp::Min>(out, in, n);
  else combine_t<T, ReduceOp::Sum>(out, in, n);
}

// out = out (op) in, elementwise; fp16 / bf16 widen to fp32, combine, round back (as the MPI
// comm's reduction does). Avg combines as Sum; the division comes after.
void combine(void* out, const void* in, size_t n, DType dt, ReduceOp op) {
  switch (dt) {
    case DType::F32: return combine_op<float>(out, in, n, op);
    case DType::F64: return combine_op<double>(out, in, n, op);
    case DType::I64: return combine_op<int64_t>(out, in, n, op);
    case DType::I32: return combine_op<int32_t>(out, in, n, op);
    case DType::I16: return combine_op<int16_t>(out, in, n, op);
    case DType::I8: return combine_op<int8_t>(out, in, n, op);
    case DType::U8: return combine_op<uint8_t>(out, in, n, op);
    case DType::U16: return combine_op<uint16_t>(out, in, n, op);
    case DType::U32: return combine_op<uint32_t>(out, in, n, op);
    case DType::U64: return combine_op<uint64_t>(out, in, n, op);
    case DType::F16:
    case DType::BF16: {
      constexpr size_t kBlock = 4096;
      float a[kBlock], b[kBlock];
      for (size_t s = 0; s < n; s += kBlock) {
        const size_t c = std::min(kBlock, n - s);
        convert(static_cast<const char*>(in) + 2 * s, dt, a, DType::F32, c);
        convert(static_cast<char*>(out) + 2 * s, dt, b, DType::F32, c);
        combine_op<float>(b, a, c, op);
        convert(b, DType::F32, static_cast<char*>(out) + 2 * s, dt, c);
      }
      return;
    }
    default: fail("shm comm: reduction of ", dtype_st_name(dt), " tensors is not supported");
  }
}

class ShmComm final : public Comm {
 public:
  ShmComm(Mapping m, int rank, int n, size_t slot, double timeout_s, std::unique_ptr<Comm> base, std::string base_name)
      : m_(std::move(m)), rank_(rank), size_(n), slot_(slot), timeout_(timeout_s), base_(std::move(base)),
        base_name_(std::move(base_name)) {
    pids_ = reinterpret_cast<const int64_t*>(m_.base + pids_offset());
    ctl_ = reinterpret_cast<Ctl*>(m_.base + ctl_offset(n));
    data_ = m_.base + data_offset(n);
    // Liveness checks need the peers' pids to be visible here (one pid namespace).
    for (int p = 0; p < n; ++p)
      if (::kill(static_cast<pid_t>(pids_[p]), 0) != 0 && errno == ESRCH) watch_pids_ = false;
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "shm(" + base_name_ + ")"; }

  void all_gather(const void* send, void* recv, size_t count, DType dt) override {
    const size_t B = count * dtype_size(dt);
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    for (size_t off = 0; off < B; off += slot_) {
      const size_t c = std::min(slot_, B - off);
      begin("all_gather");
      std::memcpy(slot(rank_), s + off, c);
      publish();
      wait_arrived();
      for (int p = 0; p < size_; ++p) std::memcpy(r + p * B + off, slot(p), c);
      finish();
    }
  }

  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) override {
    const size_t es = dtype_size(dt), per = std::max<size_t>(1, slot_ / (es * size_));
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    for (size_t o = 0; o < count; o += per) {
      const size_t e = std::min(per, count - o), eb = e * es;
      begin("reduce_scatter");
      for (int b = 0; b < size_; ++b)  // block b of my input is read by rank b (mine: from `send`)
        if (b != rank_) std::memcpy(slot(rank_) + b * eb, s + (b * count + o) * es, eb);
      publish();
      wait_arrived();
      char* out = r + o * es;
      auto part = [&](int p) -> const char* {
        return p == rank_ ? s + (rank_ * count + o) * es : slot(p) + rank_ * eb;
      };
      std::memcpy(out, part(0), eb);
      for (int p = 1; p < size_; ++p) combine(out, part(p), e, dt, op);  // in rank order
      finish();
    }
    if (op == ReduceOp::Avg) divide_by(recv, count, dt, size_);
  }

  void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) override {
    const size_t es = dtype_size(dt), per = slot_ / es;
    char* b = static_cast<char*>(buf);
    for (size_t o = 0; o < count; o += per) {
      const size_t e = std::min(per, count - o);
      begin("all_reduce");
      std::memcpy(slot(rank_), b + o * es, e * es);
      publish();
      wait_arrived();
      std::memcpy(b + o * es, slot(0), e * es);
      for (int p = 1; p < size_; ++p) combine(b + o * es, slot(p), e, dt, op);  // same order on every rank
      finish();
    }
    if (op == ReduceOp::Avg) divide_by(buf, count, dt, size_);
  }

  void broadcast(void* buf, size_t count, DType dt, int root) override {
    if (root < 0 || root >= size_) fail("broadcast: root ", root, " is not a rank of this group of ", size_);
    const size_t B = count * dtype_size(dt);
    char* b = static_cast<char*>(buf);
    for (size_t off = 0; off < B; off += slot_) {
      const size_t c = std::min(slot_, B - off);
      begin("broadcast");
      if (rank_ == root) std::memcpy(slot(root), b + off, c);
      publish();
      wait_arrived();
      if (rank_ != root) std::memcpy(b + off, slot(root), c);
      finish();
    }
  }

  void all_to_all(const void* send, void* recv, size_t count, DType dt) override {
    const size_t es = dtype_size(dt), per = std::max<size_t>(1, slot_ / (es * size_));
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    for (size_t o = 0; o < count; o += per) {
      const size_t e = std::min(per, count - o), eb = e * es;
      begin("all_to_all");
      for (int b = 0; b < size_; ++b)
        if (b != rank_) std::memcpy(slot(rank_) + b * eb, s + (b * count + o) * es, eb);
      publish();
      wait_arrived();
      for (int p = 0; p < size_; ++p) {
        const char* src = p == rank_ ? s + (rank_ * count + o) * es : slot(p) + rank_ * eb;
        std::memcpy(r + (p * count + o) * es, src, eb);
      }
      finish();
    }
  }

  void barrier() override {
    begin("barrier");
    publish();
    wait_arrived();
    finish();
  }

  // MPI_Comm_split semantics; each new group gets a segment of its own, made through this comm.
  std::unique_ptr<Comm> split(int color, int key) override {
    std::vector<int64_t> mine{color, key}, all(2 * static_cast<size_t>(size_));
    all_gather(mine.data(), all.data(), 2, DType::I64);
    std::vector<std::pair<int64_t, int>> members;  // (key, rank) of my color
    for (int r = 0; r < size_; ++r)
      if (all[2 * r] == color) members.emplace_back(all[2 * r + 1], r);
    std::sort(members.begin(), members.end());
    int index = 0;
    while (members[index].second != rank_) ++index;
    const int n = static_cast<int>(members.size());
    Mapping m = join(*this, members[0].second, index, n, slot_);
    if (!m.base) fail("shm comm: could not make the shared-memory segment of a sub-group (split) in /dev/shm");
    return std::make_unique<ShmComm>(std::move(m), index, n, slot_, timeout_, nullptr, base_name_ + " split");
  }

 private:
  Mapping m_;
  int rank_, size_;
  size_t slot_;
  double timeout_;
  std::unique_ptr<Comm> base_;  // kept alive with this comm (torch.distributed group, MPI world)
  std::string base_name_;
  const int64_t* pids_ = nullptr;
  Ctl* ctl_ = nullptr;
  char* data_ = nullptr;
  uint64_t gen_ = 0;
  const char* what_ = "";
  bool watch_pids_ = true;
  bool broken_ = false;

  char* slot(int r) const { return data_ + static_cast<size_t>(r) * slot_; }

  void begin(const char* what) {
    if (broken_) fail("shm comm: ", what, " after an earlier collective failed on this rank");
    what_ = what;
    ++gen_;
    wait_all(&Ctl::done, gen_ - 1);
  }
  void publish() { ctl_[rank_].arrive.store(gen_, std::memory_order_release); }
  void wait_arrived() { wait_all(&Ctl::arrive, gen_); }
  void finish() { ctl_[rank_].done.store(gen_, std::memory_order_release); }

  void wait_all(std::atomic<uint64_t> Ctl::*field, uint64_t target) {
    using clock = std::chrono::steady_clock;
    clock::time_point t0{}, last_check{};
    for (int p = 0; p < size_; ++p) {
      uint64_t spins = 0;
      while ((ctl_[p].*field).load(std::memory_order_acquire) < target) {
        ++spins;
        if (spins < 256) continue;
        const auto now = clock::now();
        if (t0 == clock::time_point{}) t0 = last_check = now;
        const double waited = std::chrono::duration<double>(now - t0).count();
        if (waited > timeout_) {
          broken_ = true;
          fail("rank ", rank_, ": collective ", what_, " did not complete within ", timeout_,
               " s: another rank died or stalled (shared-memory comm, waiting for rank ", p, ")");
        }
        if (watch_pids_ && now - last_check > std::chrono::milliseconds(20)) {
          last_check = now;
          if (::kill(static_cast<pid_t>(pids_[p]), 0) != 0 && errno == ESRCH) {
            broken_ = true;
            fail("rank ", rank_, ": collective ", what_, ": rank ", p, " (pid ", pids_[p],
                 ") exited before taking part (shared-memory comm)");
          }
        }
        if (waited < 0.002) std::this_thread::yield();
        else std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }
};

}  // namespace

std::unique_ptr<Comm> make_shm_comm(std::unique_ptr<Comm> base, double timeout_s) {
  if (!base || base->size() <= 1) return base;
  if (const char* e = std::getenv("VERLCPP_SHM"); e && std::string(e) == "0") return base;
  if (timeout_s <= 0) fail("collective timeout must be positive, got ", timeout_s);
  const int n = base->size();
  // Same host (and boot) for every rank, else the base comm.
  std::vector<char> id(kMsg, 0), ids(kMsg * static_cast<size_t>(n));
  const std::string h = host_identity();
  std::memcpy(id.data(), h.data(), std::min(h.size(), kMsg - 1));
  base->all_gather(id.data(), ids.data(), kMsg, DType::U8);
  int32_t same = 1;
  for (int r = 0; r < n; ++r) same &= std::memcmp(&ids[kMsg * r], id.data(), kMsg) == 0 ? 1 : 0;
  // Every rank must agree on the slot size (it comes from the environment and /dev/shm).
  int64_t smin = static_cast<int64_t>(slot_bytes(n));
  base->all_reduce(&same, 1, DType::I32, ReduceOp::Min);
  base->all_reduce(&smin, 1, DType::I64, ReduceOp::Min);
  if (!same || smin <= 0) return base;
  Mapping m = join(*base, 0, base->rank(), n, static_cast<size_t>(smin));
  if (!m.base) return base;
  const int rank = base->rank();
  const std::string name = base->name();
  return std::make_unique<ShmComm>(std::move(m), rank, n, static_cast<size_t>(smin), timeout_s, std::move(base), name);
}

}  // namespace verl
