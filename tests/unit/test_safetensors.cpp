// test_safetensors.cpp — the safetensors reader and writer against the Python `safetensors`
// package: files Python writes (every dtype) must read back with identical names, shapes and
// bytes; files we write must load in Python with the values torch expects; malformed files
// must fail with one Error that names the file and the offending key.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace verl;

namespace {

using test::slurp;
using test::spit;

// A file made of an 8-byte length, the given header text and `data` bytes.
std::string st_file(const std::string& header, const std::string& data, uint64_t len = ~0ull) {
  if (len == ~0ull) len = header.size();
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(len >> (8 * i));
  return s + header + data;
}

// Expects opening `path` to throw an Error whose message has the path and every `needles`.
void expect_error(const std::string& path, std::initializer_list<const char*> needles) {
  try {
    SafetensorsReader r(path);
    ADD_FAILURE() << path << ": no error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    for (const char* n : needles) EXPECT_NE(m.find(n), std::string::npos) << "missing '" << n << "' in: " << m;
  }
}

}  // namespace

TEST(Safetensors, ReadsEveryDtypeWrittenByPython) {
  test::TempDir dir;
  test::run_python(R"(
import sys, torch
from safetensors.torch import save_file
d = sys.argv[0].rsplit('/', 1)[0]
g = torch.Generator().manual_seed(0)
def rnd(shape, dt):
    if dt == torch.bool: return torch.rand(shape, generator=g) > 0.5
    if dt.is_floating_point: return (torch.randn(shape, generator=g) * 4).to(dt)
    info = torch.iinfo(dt)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dt)
dts = {'BOOL': torch.bool, 'U8': torch.uint8, 'I8': torch.int8, 'U16': torch.uint16, 'I16': torch.int16,
       'U32': torch.uint32, 'I32': torch.int32, 'U64': torch.uint64, 'I64': torch.int64,
       'F16': torch.float16, 'BF16': torch.bfloat16, 'F32': torch.float32, 'F64': torch.float64,
       'F8_E4M3': torch.float8_e4m3fn, 'F8_E5M2': torch.float8_e5m2, 'F8_E4M3FNUZ': torch.float8_e4m3fnuz,
       'F8_E5M2FNUZ': torch.float8_e5m2fnuz, 'F8_E8M0': torch.float8_e8m0fnu}
shapes = [(3, 5), (7,), (), (2, 0, 4), (2, 3, 4)]
ts, man = {}, []
for i, (st, dt) in enumerate(dts.items()):
    shape = shapes[i % len(shapes)]
    name = f'layer.{i}.{st.lower()}'
    ts[name] = rnd(shape, dt)
    man.append(f"{name} {st} {len(shape)} {' '.join(map(str, shape))}")
    open(f'{d}/{name}.bin', 'wb').write(ts[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
save_file(ts, f'{d}/all.safetensors', metadata={'format': 'pt', 'note': 'hello world'})
open(f'{d}/manifest.txt', 'w').write('\n'.join(man) + '\n')
)",
                   dir.path.string());
  SafetensorsReader r(dir / "all.safetensors");
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.metadata().at("note"), "hello world");
  std::istringstream man(slurp(dir / "manifest.txt"));
  std::vector<std::string> names;
  std::string name, st;
  size_t rank;
  while (man >> name >> st >> rank) {
    std::vector<int64_t> shape(rank);
    for (auto& d : shape) man >> d;
    names.push_back(name);
    const StTensor& t = r.at(name);
    EXPECT_STREQ(dtype_st_name(t.dtype), st.c_str()) << name;
    EXPECT_EQ(t.shape, shape) << name;
    const std::string want = slurp(dir / (name + ".bin"));
    ASSERT_EQ(t.nbytes(), want.size()) << name;
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(r.data(t)), t.nbytes()), want) << name;
    EXPECT_EQ(static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype), t.nbytes()) << name;
  }
  ASSERT_EQ(names.size(), 18u);
  ASSERT_EQ(r.tensors().size(), names.size());
  for (size_t i = 1; i < r.tensors().size(); ++i) EXPECT_LT(r.tensors()[i - 1].name, r.tensors()[i].name);
  EXPECT_EQ(r.find("missing"), nullptr);
  try {
    r.at("missing");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'missing'"), std::string::npos);
  }
}

TEST(Safetensors, WriterOutputLoadsInPython) {
  test::TempDir dir;
  const std::string path = dir / "out.safetensors";
  const std::vector<StSpec> specs = {{"w.f32", DType::F32, {3, 4}}, {"b.i64", DType::I64, {5}},
                                     {"empty", DType::F16, {0, 7}}, {"scalar", DType::F64, {}},
                                     {"a.bf16", DType::BF16, {2, 3}}, {"mask", DType::BOOL, {9}}};
  std::vector<float> f32(12);
  for (int i = 0; i < 12; ++i) f32[i] = 0.5f * i - 2;
  std::vector<int64_t> i64 = {-5, 0, 7, int64_t(1) << 40, -(int64_t(1) << 50)};
  double scalar = 3.25;
  std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x4049, 0x0000, 0x7F80, 0x3E00};  // 1, -2, 3.140625, 0, inf, 0.125
  std::vector<uint8_t> mask = {1, 0, 0, 1, 1, 0, 1, 0, 1};
  {
    SafetensorsWriter w(path, specs, {{"format", "pt"}, {"origin", "verl.cpp"}});
    // Deliberately chunked: byte by byte for the first tensor.
    for (size_t i = 0; i < f32.size() * 4; ++i) w.write(reinterpret_cast<const char*>(f32.data()) + i, 1);
    w.write(i64.data(), 16);
    w.write(reinterpret_cast<const char*>(i64.data()) + 16, 24);
    w.write(&scalar, 8);
    w.write(bf16.data(), 12);
    w.write(mask.data(), mask.size());
    EXPECT_EQ(w.data_bytes(), 48u + 40 + 8 + 12 + 9);
    w.finish();
  }
  EXPECT_EQ(std::filesystem::file_size(path), SafetensorsWriter::file_size(specs, {{"format", "pt"}, {"origin", "verl.cpp"}}));
  std::string out = test::run_python(R"(
import json, struct, sys, torch
from safetensors import safe_open
p = sys.argv[0].rsplit('/', 1)[0] + '/out.safetensors'
raw = open(p, 'rb').read()
n = struct.unpack('<Q', raw[:8])[0]
assert n % 8 == 0, n
h = json.loads(raw[8:8 + n])
order = [k for k in h if k != '__metadata__']
assert order == ['w.f32', 'b.i64', 'empty', 'scalar', 'a.bf16', 'mask'], order
at = 0
for k in order:
    b, e = h[k]['data_offsets']; assert b == at, (k, b, at); at = e
assert 8 + n + at == len(raw)
want = {'w.f32': torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 2,
        'b.i64': torch.tensor([-5, 0, 7, 1 << 40, -(1 << 50)]),
        'empty': torch.zeros(0, 7, dtype=torch.float16), 'scalar': torch.tensor(3.25, dtype=torch.float64),
        'a.bf16': torch.tensor([[1, -2, 3.140625], [0, float('inf'), 0.125]], dtype=torch.bfloat16),
        'mask': torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)}
with safe_open(p, 'pt') as f:
    assert f.metadata() == {'format': 'pt', 'origin': 'verl.cpp'}, f.metadata()
    assert sorted(f.keys()) == sorted(want)
    for k, v in want.items():
        t = f.get_tensor(k)
        assert t.dtype == v.dtype and t.shape == v.shape and torch.equal(t, v), (k, t, v)
print('PYTHON-OK')
)",
                                     dir.path.string());
  EXPECT_NE(out.find("PYTHON-OK"), std::string::npos) << out;
  SafetensorsReader r(path);  // and our own reader agrees
  EXPECT_EQ(r.at("b.i64").shape, std::vector<int64_t>{5});
  EXPECT_EQ(std::memcmp(r.data(r.at("scalar")), &scalar, 8), 0);
  EXPECT_EQ(r.metadata().at("origin"), "verl.cpp");
}

TEST(Safetensors, WriterRefusesWrongByteCounts) {
  test::TempDir dir;
  const std::vector<StSpec> specs = {{"x", DType::F32, {2}}};
  const char buf[16] = {};
  {
    SafetensorsWriter w(dir / "over.safetensors", specs);
    w.write(buf, 4);
    EXPECT_THROW(w.write(buf, 5), Error);
  }
  SafetensorsWriter w(dir / "under.safetensors", specs);
  w.write(buf, 7);
  try {
    w.finish();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("under.safetensors"), std::string::npos) << e.what();
  }
  EXPECT_THROW(SafetensorsWriter(dir / "dup.safetensors", {{"x", DType::F32, {1}}, {"x", DType::F32, {1}}}), Error);
  EXPECT_THROW(SafetensorsWriter(dir / "neg.safetensors", {{"x", DType::F32, {-1}}}), Error);
}

TEST(Safetensors, AcceptsPaddingEmptyAndZeroSized) {
  test::TempDir dir;
  spit(dir / "pad.st", st_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})" + std::string(13, ' '), "xy"));
  SafetensorsReader r(dir / "pad.st");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(r.data(r.at("a"))), 2), "xy");
  EXPECT_EQ(r.data_start(), 8u + 66);
  spit(dir / "empty.st", st_file("{}", ""));
  EXPECT_TRUE(SafetensorsReader(dir / "empty.st").tensors().empty());
  std::vector<StTensor> ts;
  std::map<std::string, std::string> md;
  parse_safetensors_header(R"({"z":{"dtype":"F32","shape":[4,0],"data_offsets":[3,3]},)"
                           R"("a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})",
                           3, "mem", &ts, &md);
  ASSERT_EQ(ts.size(), 2u);
  EXPECT_EQ(ts[1].name, "z");
  EXPECT_EQ(ts[1].numel(), 0);
}

TEST(Safetensors, RejectsMalformedFiles) {
  test::TempDir dir;
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string d8(8, '\1');
  struct Case { const char* file; std::string bytes; std::initializer_list<const char*> needles; };
  const Case cases[] = {
      {"short.st", "abc", {"too short"}},
      {"hdr_beyond.st", st_file(ok, d8, 1000), {"past the end"}},
      {"hdr_cap.st", st_file(ok, d8, uint64_t(1) << 40), {"limit"}},
      {"not_json.st", st_file("{\"a\":", d8), {"invalid JSON"}},
      {"array.st", st_file("[1,2]", d8), {"'{'"}},
      {"not_obj.st", st_file(R"({"a":[1]})", ""), {"'a'", "expected an object"}},
      {"bad_dtype.st", st_file(R"({"a":{"dtype":"F4","shape":[2],"data_offsets":[0,8]}})", d8), {"'a'", "unknown dtype", "F4"}},
      {"no_dtype.st", st_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8), {"'a'", "dtype"}},
      {"wrong_len.st", st_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8), {"'a'", "needs 12 bytes", "span 8"}},
      {"neg_dim.st", st_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8), {"'a'", "shape"}},
      {"float_dim.st", st_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d8), {"'a'", "shape"}},
      {"overflow.st", st_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", d8), {"'a'", "overflows"}},
      {"overflow2.st", st_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", d8), {}},
      {"past_end.st", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", d8), {"'a'", "past the data area"}},
      {"reversed.st", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8), {"'a'", "before begin"}},
      {"overlap.st", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d8), {"'b'", "overlaps"}},
      {"gap.st", st_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d8), {"'a'", "gap"}},
      {"trailing.st", st_file(ok, d8 + "zz"), {"trailing"}},
      {"truncated.st", st_file(ok, "1234"), {"'a'", "past the data area"}},
      {"bad_meta.st", st_file(R"({"__metadata__":{"k":1}})", ""), {"__metadata__", "'k'"}},
      {"dup.st", st_file(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})", ""), {"duplicate", "'a'"}},
      {"deep.st", st_file(R"({"a":{"dtype":"U8","shape":[[0]],"data_offsets":[0,0]}})", ""), {"deep"}},
      {"offsets3.st", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", d8), {"'a'", "data_offsets"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    spit(dir / c.file, c.bytes);
    expect_error(dir / c.file, c.needles);
  }
}

TEST(Safetensors, RejectsTruncatedPythonFile) {
  test::TempDir dir;
  test::run_python(R"(
import sys, torch
from safetensors.torch import save_file
d = sys.argv[0].rsplit('/', 1)[0]
save_file({'x': torch.ones(100), 'y': torch.zeros(3, 3, dtype=torch.bfloat16)}, f'{d}/t.safetensors')
)",
                   dir.path.string());
  const std::string all = slurp(dir / "t.safetensors");
  SafetensorsReader ok(dir / "t.safetensors");
  for (size_t cut : {size_t(1), size_t(100), all.size() - ok.data_start() + 3, all.size() - 4}) {
    spit(dir / "cut.safetensors", all.substr(0, all.size() - cut));
    expect_error(dir / "cut.safetensors", {});
  }
}

namespace {
// 150k tensors (a large MoE's key count): header writing and parsing are linear in the number
// of keys (both were quadratic: > 2 minutes here, past this test's CTest timeout). The file
// must also be valid for the Python reader, and read back with every name and offset.
TEST(Safetensors, ManyKeysRoundTrip) {
  test::TempDir d;
  const std::string path = d / "many.safetensors";
  const int n = 150000;
  std::vector<StSpec> specs;
  for (int i = 0; i < n; ++i) specs.push_back({"model.layers." + std::to_string(i) + ".w", DType::F32, {1}});
  {
    SafetensorsWriter w(path, specs);
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = static_cast<float>(i);
    w.write(v.data(), v.size() * sizeof(float));
    w.finish();
  }
  SafetensorsReader r(path);
  ASSERT_EQ(r.tensors().size(), static_cast<size_t>(n));
  for (int i : {0, 1, 77777, n - 1}) {
    const StTensor& t = r.at("model.layers." + std::to_string(i) + ".w");
    float x;
    std::memcpy(&x, r.data(t), 4);
    EXPECT_EQ(x, static_cast<float>(i));
  }
  const std::string out = test::run_python(R"(
import sys
from safetensors import safe_open
with safe_open(sys.argv[1] if len(sys.argv) > 1 else ")" + path + R"(", "np") as f:
    keys = list(f.keys())
    print(len(keys), float(f.get_tensor("model.layers.149999.w")[0]))
)", d.path.string());
  EXPECT_NE(out.find("150000 149999.0"), std::string::npos) << out;
}
}  // namespace
