// test_zip.cpp — the zip reader against archives written by torch.save and Python's zipfile
// (zip64 forced, archive embedded at an offset): member names, data offsets, sizes and CRCs
// must match what Python's zipfile reports, and member bytes must equal the tensors' bytes.
// Damaged archives must fail with one Error that names the file.
#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <sstream>

#include "core/error.h"
#include "io/zip.h"
#include "test_util.h"

using namespace verl;

namespace {

using test::slurp;
using test::spit;

// Python helper: a manifest "name data_offset size crc" per member, computed by zipfile
// (which also finds archives behind prepended bytes) plus the local header's own lengths.
const char* kManifest = R"(
import struct, zipfile
def manifest(path, out):
    with zipfile.ZipFile(path) as z, open(path, 'rb') as f:
        lines = []
        for i in z.infolist():
            f.seek(i.header_offset)
            nlen, xlen = struct.unpack('<HH', f.read(30)[26:30])
            lines.append(f'{i.filename} {i.header_offset + 30 + nlen + xlen} {i.file_size} {i.CRC}')
    open(out, 'w').write('\n'.join(lines) + '\n')
)";

struct Member { std::string name; uint64_t offset, size; uint32_t crc; };
std::vector<Member> read_manifest(const std::string& p) {
  std::istringstream in(slurp(p));
  std::vector<Member> m;
  Member x;
  while (in >> x.name >> x.offset >> x.size >> x.crc) m.push_back(x);
  return m;
}

void expect_same(const ZipReader& z, const std::vector<Member>& want) {
  ASSERT_EQ(z.entries().size(), want.size());
  for (const auto& w : want) {
    const ZipEntry* e = z.find(w.name);
    ASSERT_NE(e, nullptr) << w.name;
    EXPECT_EQ(e->data_offset, w.offset) << w.name;
    EXPECT_EQ(e->size, w.size) << w.name;
    EXPECT_EQ(e->crc32, w.crc) << w.name;
  }
}

template <class F>
std::string error_of(F&& f) {
  return test::error_of(f, "(no error)");
}

}  // namespace

TEST(Zip, ReadsTorchSaveArchive) {
  test::TempDir dir;
  test::run_python(std::string(kManifest) + R"(
import sys, torch, zipfile
d = sys.argv[0].rsplit('/', 1)[0]
g = torch.Generator().manual_seed(0)
sd = {'a': torch.randn(5, 7, generator=g), 'b': torch.arange(100, dtype=torch.int64),
      'c': torch.randn(3, generator=g).bfloat16()}
torch.save(sd, f'{d}/foo.pt')
manifest(f'{d}/foo.pt', f'{d}/manifest.txt')
with zipfile.ZipFile(f'{d}/foo.pt') as z:
    for i, k in enumerate(sd):  # torch numbers storages in pickling order
        assert z.read(f'foo/data/{i}') == sd[k].view(torch.uint8).numpy().tobytes()
        open(f'{d}/{k}.bin', 'wb').write(sd[k].view(torch.uint8).numpy().tobytes())
    open(f'{d}/data.pkl', 'wb').write(z.read('foo/data.pkl'))
)",
                   dir.path.string());
  ZipReader z(dir / "foo.pt");
  expect_same(z, read_manifest(dir / "manifest.txt"));
  EXPECT_EQ(z.torch_prefix(), "foo");
  EXPECT_EQ(z.read(*z.find("foo/data.pkl")), slurp(dir / "data.pkl"));
  EXPECT_EQ(z.read(*z.find("foo/byteorder")), "little");
  const char* keys[] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    const ZipEntry* e = z.find("foo/data/" + std::to_string(i));
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->data_offset % 64, 0u) << e->name;  // torch aligns storages to 64 bytes
    EXPECT_EQ(z.read(*e), slurp(dir / (std::string(keys[i]) + ".bin"))) << e->name;
  }
  // Ranged reads and their bounds.
  const ZipEntry& b = *z.find("foo/data/1");
  int64_t v[3];
  z.read_at(b, 8 * 40, v, sizeof v);
  EXPECT_EQ(v[0], 40);
  EXPECT_EQ(v[2], 42);
  EXPECT_NE(error_of([&] { z.read_at(b, 8 * 99, v, 16); }).find("foo.pt"), std::string::npos);
  EXPECT_NE(error_of([&] { z.read(b, 10); }).find("foo/data/1"), std::string::npos);
  EXPECT_EQ(z.find("foo/data/9"), nullptr);
}

TEST(Zip, ReadsZip64WrittenByPython) {
  test::TempDir dir;
  test::run_python(std::string(kManifest) + R"(
import sys, zipfile
d = sys.argv[0].rsplit('/', 1)[0]
# Lower the limits so that a small archive uses every zip64 structure: local and central
# zip64 extra fields (sizes and header offsets) and the zip64 end-of-central-directory.
zipfile.ZIP64_LIMIT = 1000
zipfile.ZIP_FILECOUNT_LIMIT = 2
with zipfile.ZipFile(f'{d}/z64.zip', 'w', zipfile.ZIP_STORED) as z:
    for i in range(5):
        with z.open(f'pre_{i}/data/{i}', 'w', force_zip64=True) as f:
            f.write(bytes((i * 7 + j) % 251 for j in range(700 + 300 * i)))
    z.writestr('pre_x/data.pkl', b'pickle-bytes')
    z.writestr('empty', b'')
raw = open(f'{d}/z64.zip', 'rb').read()
assert raw.count(b'PK\x06\x06') == 1 and raw.count(b'PK\x06\x07') == 1
manifest(f'{d}/z64.zip', f'{d}/manifest.txt')
)",
                   dir.path.string());
  ZipReader z(dir / "z64.zip");
  const auto want = read_manifest(dir / "manifest.txt");
  ASSERT_EQ(want.size(), 7u);
  expect_same(z, want);
  EXPECT_EQ(z.torch_prefix(), "pre_x");
  const std::string m3 = z.read(*z.find("pre_3/data/3"));
  ASSERT_EQ(m3.size(), 1600u);
  for (size_t j = 0; j < m3.size(); ++j) ASSERT_EQ(static_cast<uint8_t>(m3[j]), (3 * 7 + j) % 251) << j;
  EXPECT_EQ(z.read(*z.find("empty")), "");
}

TEST(Zip, ReadsArchiveEmbeddedAtAnOffset) {
  test::TempDir dir;
  test::run_python(std::string(kManifest) + R"(
import sys, torch
d = sys.argv[0].rsplit('/', 1)[0]
torch.save({'w': torch.arange(50, dtype=torch.float32)}, f'{d}/item.pt')
zip = open(f'{d}/item.pt', 'rb').read()
open(f'{d}/blob.distcp', 'wb').write(b'J' * 1000 + zip + b'T' * 333)
open(f'{d}/tail.distcp', 'wb').write(b'J' * 1000 + zip)
manifest(f'{d}/tail.distcp', f'{d}/manifest.txt')
open(f'{d}/w.bin', 'wb').write(torch.arange(50, dtype=torch.float32).numpy().tobytes())
)",
                   dir.path.string());
  const std::string zip = slurp(dir / "item.pt");
  auto f = std::make_shared<File>(dir / "blob.distcp");
  ZipReader z(f, 1000, zip.size());
  expect_same(z, read_manifest(dir / "manifest.txt"));
  EXPECT_EQ(z.torch_prefix(), "item");
  EXPECT_EQ(z.read(*z.find("item/data/0")), slurp(dir / "w.bin"));
  // With no trailer, length 0 means "to the end of the file".
  ZipReader z2(std::make_shared<File>(dir / "tail.distcp"), 1000);
  EXPECT_EQ(z2.read(*z2.find("item/data/0")), slurp(dir / "w.bin"));
  // Opened without its base, the offsets point at the junk: a clear error, not garbage.
  EXPECT_NE(error_of([&] { ZipReader bad(dir / "tail.distcp"); }).find("tail.distcp"), std::string::npos);
  EXPECT_NE(error_of([&] { ZipReader bad(f, f->size() + 1); }).find("blob.distcp"), std::string::npos);
  EXPECT_NE(error_of([&] { ZipReader bad(f, 1000, f->size()); }).find("blob.distcp"), std::string::npos);
  // A member outside the archive's extent is refused by read_at.
  ZipEntry outside{"x", 10, 4, 0};
  char buf[4];
  EXPECT_NE(error_of([&] { z.read_at(outside, 0, buf, 4); }).find("outside"), std::string::npos);
}

TEST(Zip, RejectsDamagedArchives) {
  test::TempDir dir;
  test::run_python(R"(
import sys, torch, zipfile
d = sys.argv[0].rsplit('/', 1)[0]
torch.save({'a': torch.ones(10)}, f'{d}/good.pt')
with zipfile.ZipFile(f'{d}/deflated.zip', 'w', zipfile.ZIP_STORED) as z:
    z.writestr('p/data.pkl', b'x' * 100)
    z.writestr('p/data/0', b'y' * 1000, compress_type=zipfile.ZIP_DEFLATED)
with zipfile.ZipFile(f'{d}/nopkl.zip', 'w') as z:
    z.writestr('p/other', b'x')
)",
                   dir.path.string());
  const std::string good = slurp(dir / "good.pt");
  const size_t cd = good.find("PK\x01\x02");
  ASSERT_NE(cd, std::string::npos);
  auto patched = [&](size_t at, const std::string& bytes) {
    std::string s = good;
    s.replace(at, bytes.size(), bytes);
    return s;
  };
  struct Case { const char* file; std::string bytes; const char* needle; };
  const Case cases[] = {
      {"tiny.pt", "PK\x05", "too short"},
      {"truncated.pt", good.substr(0, good.size() - 10), "end-of-central-directory"},
      {"half.pt", good.substr(0, good.size() / 2), "end-of-central-directory"},
      {"bad_cd_sig.pt", patched(cd, "XX"), "central directory entry 0"},
      {"bad_method.pt", patched(cd + 10, std::string("\x08\x00", 2)), "method 8"},
      {"bad_local_off.pt", patched(cd + 42, std::string("\x00\x00\x00\x70", 4)), "local header offset"},
      {"bad_size.pt", patched(cd + 20, std::string("\x00\x00\x00\x70\x00\x00\x00\x70", 8)), "data"},
      {"bad_name_len.pt", patched(cd + 28, std::string("\xff\xff", 2)), "runs past"},
      {"bad_local_sig.pt", patched(0, "QQ"), "no local file header"},
      {"junk.pt", std::string(5000, 'j'), "not a zip archive"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    spit(dir / c.file, c.bytes);
    const std::string m = error_of([&] { ZipReader z(dir / c.file); });
    EXPECT_NE(m.find(dir / c.file), std::string::npos) << m;
    EXPECT_NE(m.find(c.needle), std::string::npos) << m;
  }
  const std::string m = error_of([&] { ZipReader z(dir / "deflated.zip"); });
  EXPECT_NE(m.find("deflated.zip"), std::string::npos) << m;
  EXPECT_NE(m.find("'p/data/0'"), std::string::npos) << m;
  EXPECT_NE(m.find("compressed"), std::string::npos) << m;
  ZipReader nopkl(dir / "nopkl.zip");
  const std::string m2 = error_of([&] { nopkl.torch_prefix(); });
  EXPECT_NE(m2.find("nopkl.zip"), std::string::npos) << m2;
  EXPECT_NE(m2.find("data.pkl"), std::string::npos) << m2;
}
