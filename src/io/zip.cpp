// zip.cpp — reader for stored (uncompressed) zip / zip64 archives as written by torch.save
// (see zip.h). Everything read from the archive is untrusted: each offset and size is checked
// against the archive's extent [base, base+length) before use, with overflow-safe arithmetic.
#include "io/zip.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace verl {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50, kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kEocdSize = 22, kLocatorSize = 20, kZip64EocdSize = 56, kCentralSize = 46, kLocalSize = 30;
constexpr uint64_t kMaxComment = 65535;
constexpr uint64_t kMaxEntries = 1u << 20;
constexpr uint64_t kMaxCentralDir = 256u << 20;
constexpr size_t kMaxName = 4096;
constexpr uint32_t k32 = 0xFFFFFFFFu;

uint16_t u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t u32(const uint8_t* p) { return u16(p) | static_cast<uint32_t>(u16(p + 2)) << 16; }
uint64_t u64(const uint8_t* p) { return u32(p) | static_cast<uint64_t>(u32(p + 4)) << 32; }
const uint8_t* bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// True when [off, off+n) lies inside [0, limit).
bool inside(uint64_t off, uint64_t n, uint64_t limit) { return off <= limit && n <= limit - off; }

// The archive's bytes [base, base+length) of its file, and its name for messages.
struct Archive {
  const File& file;
  uint64_t base, length;
  std::string w;  // the path (and the offset of an archive inside a larger file)
  std::string read(uint64_t off, uint64_t n) const { return file.read_string(static_cast<size_t>(n), base + off); }
};

// Where the central directory is, from the end-of-central-directory record(s).
struct CentralDir {
  uint64_t count = 0, size = 0, offset = 0;
  uint64_t end = 0;  // where the central directory must end (the EOCD or zip64 EOCD record)
};

// Zip64: a locator just before the EOCD points at the zip64 EOCD record, whose values win.
void apply_zip64_eocd(const Archive& a, CentralDir& cd) {
  if (cd.end < kLocatorSize) return;
  const std::string loc = a.read(cd.end - kLocatorSize, kLocatorSize);
  if (u32(bytes(loc)) != kZip64LocatorSig) return;
  const uint64_t rec = u64(bytes(loc) + 8);
  if (u32(bytes(loc) + 4) != 0 || u32(bytes(loc) + 16) > 1) fail(a.w, ": multi-disk zip64 archives are not supported");
  if (!inside(rec, kZip64EocdSize, cd.end - kLocatorSize))
    fail(a.w, ": zip64 end-of-central-directory offset ", rec, " is outside the archive");
  const std::string r = a.read(rec, kZip64EocdSize);
  const uint8_t* z = bytes(r);
  if (u32(z) != kZip64EocdSig)
    fail(a.w, ": expected a zip64 end-of-central-directory record at offset ", rec, ", found another signature");
  if (u32(z + 16) != 0 || u32(z + 20) != 0 || u64(z + 24) != u64(z + 32))
    fail(a.w, ": multi-disk zip64 archives are not supported");
  cd.count = u64(z + 32), cd.size = u64(z + 40), cd.offset = u64(z + 48);
  cd.end = rec;
}

// End of central directory: the last signature whose comment fits in the archive.
CentralDir find_central_dir(const Archive& a) {
  if (a.length < kEocdSize) fail(a.w, ": ", a.length, " bytes, too short for a zip archive");
  const uint64_t tail = std::min(a.length, kEocdSize + kMaxComment);
  const std::string t = a.read(a.length - tail, tail);
  uint64_t found = tail;
  for (uint64_t i = tail - kEocdSize + 1; i-- > 0;)
    if (u32(bytes(t) + i) == kEocdSig && i + kEocdSize + u16(bytes(t) + i + 20) <= tail) {
      found = i;
      break;
    }
  if (found == tail) fail(a.w, ": not a zip archive (no end-of-central-directory record found)");
  const uint8_t* e = bytes(t) + found;
  if (u16(e + 4) != 0 || u16(e + 6) != 0 || u16(e + 8) != u16(e + 10))
    fail(a.w, ": multi-disk zip archives are not supported");
  CentralDir cd{u16(e + 10), u32(e + 12), u32(e + 16), a.length - tail + found};
  apply_zip64_eocd(a, cd);
  if (cd.count > kMaxEntries) fail(a.w, ": ", cd.count, " entries, more than the limit of ", kMaxEntries);
  if (!inside(cd.offset, cd.size, cd.end))
    fail(a.w, ": central directory [", cd.offset, ", +", cd.size, ") lies outside the archive (which ends at ", cd.end, ")");
  if (cd.size > kMaxCentralDir) fail(a.w, ": central directory of ", cd.size, " bytes exceeds the limit");
  if (cd.count * kCentralSize > cd.size)
    fail(a.w, ": central directory of ", cd.size, " bytes is too small for ", cd.count, " entries");
  return cd;
}

// One central directory entry's sizes and local header offset (32-bit, or zip64 values).
struct EntrySizes {
  uint64_t csize, usize, local, disk;
};

// Zip64 extended information: the 8-byte values replace the 0xFFFFFFFF markers, in order.
void apply_zip64_extra(const uint8_t* x, uint16_t xlen, const std::string& m, EntrySizes& z) {
  const bool need64 = z.usize == k32 || z.csize == k32 || z.local == k32 || z.disk == 0xFFFF;
  bool have64 = false;
  for (const uint8_t* xe = x + xlen; xe - x >= 4;) {
    const uint16_t id = u16(x), len = u16(x + 2);
    if (len > xe - x - 4) fail(m, ": extra field runs past its entry");
    if (id == 0x0001 && need64) {
      const uint8_t *f = x + 4, *fe = f + len;
      for (uint64_t* v : {&z.usize, &z.csize, &z.local}) {
        if (*v != k32) continue;
        if (fe - f < 8) fail(m, ": zip64 extra field is too short");
        *v = u64(f), f += 8;
      }
      if (z.disk == 0xFFFF) {
        if (fe - f < 4) fail(m, ": zip64 extra field is too short");
        z.disk = u32(f);
      }
      have64 = true;
    }
    x += 4 + len;
  }
  if (need64 && !have64) fail(m, ": sizes marked as zip64 but the zip64 extra field is missing");
}

// The member's data offset in the archive, from its local header (whose extra field may
// differ from the central one: torch pads it), checked to end before the central directory.
uint64_t member_data(const Archive& a, const std::string& m, const std::string& name, uint64_t local, uint64_t usize,
                     uint64_t cd_off) {
  const uint64_t nlen = name.size();
  if (!inside(local, kLocalSize + nlen, cd_off))
    fail(m, ": local header offset ", local, " is outside the archive data (which ends at ", cd_off, ")");
  const std::string lh = a.read(local, kLocalSize + nlen);
  const uint8_t* l = bytes(lh);
  if (u32(l) != kLocalSig) fail(m, ": no local file header at offset ", local);
  if (u16(l + 8) != 0) fail(m, ": compressed with method ", u16(l + 8), " (local header), expected 0 (stored)");
  if (u16(l + 26) != nlen || std::memcmp(l + kLocalSize, name.data(), nlen) != 0)
    fail(m, ": local header name differs from the central directory");
  const uint64_t data = local + kLocalSize + nlen + u16(l + 28);
  if (!inside(data, usize, cd_off))
    fail(m, ": data [", data, ", +", usize, ") runs past the archive data (which ends at ", cd_off, ")");
  return data;
}

// Central directory entry i at `pos` of `cd`; advances pos past it.
ZipEntry parse_entry(const Archive& a, const std::string& cd, const CentralDir& dir, uint64_t i, uint64_t& pos) {
  const uint8_t* c = bytes(cd) + pos;
  if (!inside(pos, kCentralSize, dir.size) || u32(c) != kCentralSig)
    fail(a.w, ": central directory entry ", i, " at offset ", dir.offset + pos, " is corrupted (bad signature)");
  const uint16_t flags = u16(c + 8), method = u16(c + 10), nlen = u16(c + 28), xlen = u16(c + 30);
  EntrySizes z{u32(c + 20), u32(c + 24), u32(c + 42), u16(c + 34)};
  const uint64_t entry_len = kCentralSize + nlen + xlen + u16(c + 32);
  if (!inside(pos, entry_len, dir.size)) fail(a.w, ": central directory entry ", i, " runs past the end of the central directory");
  ZipEntry ent;
  ent.name.assign(reinterpret_cast<const char*>(c + kCentralSize), nlen);
  ent.crc32 = u32(c + 16);
  const std::string m = a.w + ": member '" + ent.name + "'";
  if (nlen == 0 || nlen > kMaxName) fail(a.w, ": central directory entry ", i, " has a name of ", nlen, " bytes");
  apply_zip64_extra(c + kCentralSize + nlen, xlen, m, z);
  if (method != 0) fail(m, ": compressed with method ", method, ", expected 0 (stored); re-save it without compression");
  if (flags & 1) fail(m, ": encrypted members are not supported");
  if (z.disk != 0) fail(m, ": multi-disk zip archives are not supported");
  if (z.csize != z.usize) fail(m, ": stored member has compressed size ", z.csize, " != size ", z.usize);
  ent.data_offset = a.base + member_data(a, m, ent.name, z.local, z.usize, dir.offset);
  ent.size = z.usize;
  pos += entry_len;
  return ent;
}

}  // namespace

ZipReader::ZipReader(std::shared_ptr<const File> file, uint64_t base, uint64_t length)
    : file_(std::move(file)), base_(base), length_(length) {
  if (!file_) fail("zip: no file given");
  const uint64_t size = file_->size();
  if (base_ > size) fail(path(), ": zip archive offset ", base_, " is past the end of the file (", size, " bytes)");
  if (length_ == 0) length_ = size - base_;
  if (length_ > size - base_)
    fail(path(), ": zip archive [", base_, ", ", base_ + length_, ") goes past the end of the file (", size, " bytes)");
  parse();
}

ZipReader::ZipReader(const std::string& path) : ZipReader(std::make_shared<File>(path)) {}

void ZipReader::parse() {
  const Archive a{*file_, base_, length_,
                  base_ ? path() + " (zip archive at offset " + std::to_string(base_) + ")" : path()};
  const CentralDir dir = find_central_dir(a);
  const std::string cd = a.read(dir.offset, dir.size);
  entries_.clear();
  index_.clear();
  entries_.reserve(dir.count);
  uint64_t pos = 0;
  for (uint64_t i = 0; i < dir.count; ++i) {
    ZipEntry ent = parse_entry(a, cd, dir, i, pos);
    if (!index_.emplace(ent.name, entries_.size()).second)
      fail(a.w, ": member '", ent.name, "': appears twice in the archive");
    entries_.push_back(std::move(ent));
  }

  // A torch.save archive has exactly one "<prefix>/data.pkl" at the top level.
  size_t n = 0;
  for (const auto& en : entries_) {
    const size_t k = en.name.size();
    if (k > 9 && en.name.compare(k - 9, 9, "/data.pkl") == 0 && en.name.find('/') == k - 9) {
      if (++n == 1) prefix_ = en.name.substr(0, k - 9);
    }
  }
  if (n != 1) prefix_.clear();
}

const ZipEntry* ZipReader::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const std::string& ZipReader::torch_prefix() const {
  if (prefix_.empty()) {
    size_t n = 0;
    for (const auto& e : entries_)
      n += e.name.size() > 9 && e.name.ends_with("/data.pkl") && e.name.find('/') == e.name.size() - 9;
    if (n == 0) fail(path(), ": not a torch.save archive: no '<prefix>/data.pkl' record");
    fail(path(), ": ambiguous torch.save archive: ", n, " '<prefix>/data.pkl' records");
  }
  return prefix_;
}

std::string ZipReader::read(const ZipEntry& e, size_t max_bytes) const {
  if (e.size > max_bytes)
    fail(path(), ": member '", e.name, "' is ", e.size, " bytes, more than the ", max_bytes, " allowed");
  std::string s(static_cast<size_t>(e.size), '\0');
  read_at(e, 0, s.data(), s.size());
  return s;
}

void ZipReader::read_at(const ZipEntry& e, uint64_t off, void* dst, size_t n) const {
  if (!inside(off, n, e.size))
    fail(path(), ": member '", e.name, "': read of [", off, ", +", n, ") is outside its ", e.size, " bytes");
  if (e.data_offset < base_ || !inside(e.data_offset - base_, e.size, length_))
    fail(path(), ": member '", e.name, "' at offset ", e.data_offset, " lies outside the archive");
  if (n) file_->read_at(dst, n, e.data_offset + off);
}

}  // namespace verl
