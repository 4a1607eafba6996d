// test_pickle.cpp — the safe pickle reader against Python: plain data in protocols 0–5,
// torch.save state dicts (views, offsets, dtypes, shared storages), a DTensor, a DCP
// .metadata file and protocol-5 dataclasses; then malformed and hostile input.
// References are produced at test time by the pinned Python/torch (tests/unit/test_util.h).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>

#include "core/error.h"
#include "io/pickle.h"
#include "test_util.h"

namespace verl {
namespace {

using K = Value::Kind;
using json = nlohmann::json;
using test::TempDir;
using namespace std::string_literals;

using test::slurp;

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) out += {d[c >> 4], d[c & 15]};
  return out;
}

// Same canonical text as canon() in the Python snippet below.
std::string canon(const Value& v) {
  auto seq = [](const std::vector<ValuePtr>& items) {
    std::string s;
    for (const auto& x : items) s += canon(*x);
    return s;
  };
  switch (v.kind) {
    case K::None: return "N";
    case K::Bool: return v.b ? "T" : "F";
    case K::Int: return "i" + std::to_string(v.i) + ";";
    case K::Float: {
      uint64_t u;
      std::memcpy(&u, &v.f, 8);
      char buf[32];
      std::snprintf(buf, sizeof buf, "f%016llx;", static_cast<unsigned long long>(u));
      return buf;
    }
    case K::Str: return "s" + std::to_string(v.str.size()) + ":" + hex(v.str) + ";";
    case K::Bytes: return "b" + std::to_string(v.str.size()) + ":" + hex(v.str) + ";";
    case K::Tuple: return "(" + seq(v.items) + ")";
    case K::List: return "[" + seq(v.items) + "]";
    case K::Dict: return "{" + seq(v.items) + "}";
    case K::Set: return "<" + seq(v.items) + ">";
    case K::Object:
      if (v.str == "builtins.int") return "BIG;";
      return "O" + v.str + (v.state ? canon(*v.state) : "N");
    default: return "?" + v.repr();
  }
}

const char* kCanonPy = R"PY(
import struct
def canon(x):
    if x is None: return 'N'
    if x is True: return 'T'
    if x is False: return 'F'
    if isinstance(x, int): return f'i{x};' if -2**63 <= x < 2**63 else 'BIG;'
    if isinstance(x, float): return 'f%016x;' % struct.unpack('<Q', struct.pack('<d', x))[0]
    if isinstance(x, str):
        b = x.encode('utf-8', 'surrogatepass'); return f's{len(b)}:{b.hex()};'
    if isinstance(x, (bytes, bytearray)): return f'b{len(x)}:{bytes(x).hex()};'
    if isinstance(x, tuple): return '(' + ''.join(map(canon, x)) + ')'
    if isinstance(x, list): return '[' + ''.join(map(canon, x)) + ']'
    if isinstance(x, dict): return '{' + ''.join(canon(k) + canon(v) for k, v in x.items()) + '}'
    if isinstance(x, (set, frozenset)): return '<' + ''.join(map(canon, x)) + '>'
    return custom_canon(x)
)PY";

ValuePtr parse_file(const std::string& path) { return parse_pickle(slurp(path), path); }

// ---------------------------------------------------------------------------------------

TEST(Pickle, PlainDataAllProtocols) {
  TempDir dir;
  test::run_python(std::string(kCanonPy) + R"PY(
import os, pickle
D = ')PY" + dir.path.string() + R"PY('
class Point:
    def __init__(self, x, y): self.x, self.y = x, y
class Evil:
    def __reduce__(self): return (os.system, ('touch ' + D + '/pwned',))
def custom_canon(x):
    if isinstance(x, Point): return 'O__main__.Point' + canon(vars(x))
    if isinstance(x, Evil): return 'O' + os.system.__module__ + '.systemN'
    raise TypeError(type(x))
shared = [1, 'two']
data = {
  'ints': [0, 1, -1, 127, 128, 255, 256, 65535, 65536, -129, -32769, 2**31 - 1, -2**31, 2**31,
           -2**31 - 1, 2**40, -2**40, 2**62, 2**63 - 1, -2**63],
  'big': [2**63, -2**63 - 1, 2**64 - 1, 10**30, -10**40],
  'floats': [0.0, -0.0, 1.5, -2.25, 0.1, 1e300, 5e-324, float('inf'), float('-inf')],
  'strs': ['', 'abc', 'h\u00e9llo w\u00f6rld', '\u65e5\u672c\u8a9e', '\U0001f642 emoji',
           'quote\'s "dq" back\\slash\nnew\rline\x00nul\x1a', '\\u0041 not an escape', 'x' * 300],
  'bytes': [b'', b'\x00\xff\x80abc', bytes(range(256)), b'y' * 300],
  'bytearray': bytearray(b'ba\x00\xff'),
  'tuples': [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (1, (2, (3,)))],
  'nested': {'a': {'b': {'c': [None, True, False, [[], {}]]}}},
  'keys': {1: 'one', -5: 'minus five', (1, 2): 'tuple key', None: 'none', 2.5: 'float', b'k': 'bytes'},
  'sets': [{1, 2, 3}, frozenset({'a', 'b'}), set()],
  'shared': [shared, shared, shared],
  'point': Point(1, 'two'),
  'evil': Evil(),
}
for p in range(6):
    open(f'{D}/p{p}.pkl', 'wb').write(pickle.dumps(data, protocol=p))
open(f'{D}/canon.txt', 'w').write(canon(data))
)PY",
                   dir.path.string());
  const std::string want = slurp(dir / "canon.txt");
  ASSERT_FALSE(want.empty());
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE("protocol " + std::to_string(p));
    ValuePtr root;
    ASSERT_NO_THROW(root = parse_file(dir / ("p" + std::to_string(p) + ".pkl")));
    EXPECT_EQ(canon(*root), want);
    // Memo references share one Value, as in Python.
    auto shared = root->get("shared");
    ASSERT_TRUE(shared && shared->items.size() == 3);
    EXPECT_EQ(shared->items[0].get(), shared->items[1].get());
    EXPECT_EQ(shared->items[0].get(), shared->items[2].get());
    // The os.system call is an inert record.
    auto evil = root->get("evil");
    ASSERT_TRUE(evil && evil->is(K::Object));
    EXPECT_EQ(evil->str, "posix.system");
    ASSERT_TRUE(evil->args && evil->args->items.size() == 1);
    EXPECT_EQ(evil->args->items[0]->as_str(), "touch " + (dir / "pwned"));
    EXPECT_FALSE(std::filesystem::exists(dir / "pwned"));
    // Accessors.
    auto point = root->get("point");
    EXPECT_EQ(point->attr("x")->as_int(), 1);
    EXPECT_EQ(point->attr("y")->as_str(), "two");
    EXPECT_EQ(point->attr("z"), nullptr);
    EXPECT_EQ(root->get("ints")->items.back()->as_int(), INT64_MIN);
    EXPECT_THROW(root->get("big")->items[0]->as_int("big"), Error);
    EXPECT_THROW(root->get("strs")->as_str("strs"), Error);
    EXPECT_FALSE(root->repr().empty());
  }
}

TEST(Pickle, TorchSaveStateDict) {
  TempDir dir;
  test::run_python(R"PY(
import json, sys, zipfile, torch
D = ')PY" + dir.path.string() + R"PY('
torch.manual_seed(0)
base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
sd = {
  'base': base, 'transposed': base.t(), 'slice': base[2:5, 3:7], 'strided': base[:, ::3],
  'bf16': torch.randn(3, 4).to(torch.bfloat16), 'i64': torch.arange(5, dtype=torch.int64),
  'scalar': torch.tensor(3.5, dtype=torch.float64), 'empty': torch.zeros(0, 3),
  'expanded': torch.ones(3, 1).expand(3, 4), 'half': torch.ones(2, 3, dtype=torch.float16).t(),
  'u16': torch.tensor([1, 2, 3], dtype=torch.uint16),
  'f8': torch.zeros(5, dtype=torch.float8_e4m3fn)[2:], 'bool': torch.tensor([True, False]),
  'param': torch.nn.Parameter(torch.ones(2, 2)), 'i32': torch.arange(8, dtype=torch.int32)[1::2],
}
torch.save({'model': sd, 'module': torch.nn.Linear(3, 2).state_dict(), 'step': 7}, f'{D}/sd.pt')
z = zipfile.ZipFile(f'{D}/sd.pt')
pkl = [n for n in z.namelist() if n.endswith('/data.pkl')][0]
open(f'{D}/sd.pkl', 'wb').write(z.read(pkl))
prefix = pkl[:-len('data.pkl')] + 'data/'
records = {n[len(prefix):]: z.getinfo(n).file_size for n in z.namelist() if n.startswith(prefix)}
desc = {k: dict(size=list(t.shape), stride=list(t.stride()), offset=t.storage_offset(),
                dtype=str(t.dtype)[len('torch.'):], ptr=t.untyped_storage().data_ptr(),
                nbytes=t.untyped_storage().nbytes(), contiguous=t.is_contiguous())
        for k, t in sd.items()}
json.dump({'tensors': desc, 'records': records}, open(f'{D}/desc.json', 'w'))
)PY",
                   dir.path.string());
  const json ref = json::parse(slurp(dir / "desc.json"));
  ValuePtr root = parse_file(dir / "sd.pkl");
  ASSERT_TRUE(root->is(K::Dict));
  EXPECT_EQ(root->get("step")->as_int(), 7);
  auto model = root->get("model");
  ASSERT_TRUE(model && model->is(K::Dict));
  ASSERT_EQ(model->dict_size(), ref["tensors"].size());

  std::map<int64_t, int64_t> key_of_ptr;  // storage sharing must match data_ptr sharing
  for (const auto& [name, d] : ref["tensors"].items()) {
    SCOPED_TRACE(name);
    auto v = model->get(name);
    ASSERT_TRUE(v && v->is(K::Tensor)) << (v ? v->repr() : "missing");
    const TensorRef& t = *v->tensor;
    EXPECT_EQ(t.size, d["size"].get<std::vector<int64_t>>());
    EXPECT_EQ(t.stride, d["stride"].get<std::vector<int64_t>>());
    EXPECT_EQ(t.storage_offset, d["offset"].get<int64_t>());
    EXPECT_EQ(dtype_torch_name(t.dtype), d["dtype"].get<std::string>());
    EXPECT_EQ(t.is_contiguous(), d["contiguous"].get<bool>());
    int64_t n = 1;
    for (auto s : t.size) n *= s;
    EXPECT_EQ(t.numel(), n);
    ASSERT_TRUE(ref["records"].contains(t.storage.key)) << t.storage.key;
    const int64_t nbytes = d["nbytes"];
    EXPECT_EQ(ref["records"][t.storage.key].get<int64_t>(), nbytes);
    EXPECT_EQ(t.storage.numel * static_cast<int64_t>(dtype_size(t.storage.dtype)), nbytes);
    EXPECT_EQ(t.storage.location, "cpu");
    auto [it, fresh] = key_of_ptr.try_emplace(d["ptr"].get<int64_t>(), std::stoll(t.storage.key));
    EXPECT_EQ(it->second, std::stoll(t.storage.key)) << "storage sharing differs from torch";
  }
  // New-style dtypes come through _rebuild_tensor_v3 with an UntypedStorage (bytes).
  EXPECT_EQ(model->get("u16")->tensor->storage.dtype, DType::U8);
  EXPECT_EQ(model->get("u16")->tensor->dtype, DType::U16);
  EXPECT_EQ(model->get("f8")->tensor->dtype, DType::F8_E4M3);
  // An nn.Module state dict is an OrderedDict whose `_metadata` attribute stays out of its items.
  auto module = root->get("module");
  ASSERT_TRUE(module && module->is(K::Dict));
  EXPECT_EQ(module->dict_size(), 2u);
  EXPECT_TRUE(module->get("weight") && module->get("weight")->is(K::Tensor));
  EXPECT_EQ(module->get("_metadata"), nullptr);
  EXPECT_TRUE(module->attr("_metadata") && module->attr("_metadata")->is(K::Dict));
}

TEST(Pickle, DTensor) {
  TempDir dir;
  test::run_python(R"PY(
import json, os, socket, zipfile, torch, torch.distributed as dist
D = ')PY" + dir.path.string() + R"PY('
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
dist.init_process_group('gloo', rank=0, world_size=1)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import distribute_tensor, Shard
mesh = DeviceMesh('cpu', [0], mesh_dim_names=('fsdp',))
dt = distribute_tensor(torch.arange(12.).reshape(4, 3), mesh, [Shard(0)])
torch.save({'w': dt}, f'{D}/dt.pt')
z = zipfile.ZipFile(f'{D}/dt.pt')
open(f'{D}/dt.pkl', 'wb').write(z.read([n for n in z.namelist() if n.endswith('/data.pkl')][0]))
loc = dt.to_local()
json.dump(dict(cls=type(dt).__module__ + '.' + type(dt).__name__, global_shape=list(dt.shape),
               local_shape=list(loc.shape), local_stride=list(loc.stride()), offset=loc.storage_offset(),
               dims=[p.dim for p in dt.placements], mesh_dim_names=list(mesh.mesh_dim_names),
               mesh_shape=list(mesh.mesh.shape)),
          open(f'{D}/desc.json', 'w'))
dist.destroy_process_group()
)PY",
                   dir.path.string());
  const json ref = json::parse(slurp(dir / "desc.json"));
  ValuePtr root = parse_file(dir / "dt.pkl");
  auto dt = root->get("w");
  ASSERT_TRUE(dt && dt->is(K::Object)) << root->repr();
  EXPECT_EQ(dt->str, ref["cls"].get<std::string>());
  // args = (cls, dtype, global size, global stride, offset, layout, device, requires_grad)
  ASSERT_TRUE(dt->args && dt->args->items.size() >= 3);
  EXPECT_EQ(dt->args->items[1]->str, "torch.float32");
  EXPECT_EQ(canon(*dt->args->items[2]), "(i4;i3;)");
  // state = (None or {}, {'_local_tensor': ..., '_spec': ...}); attr() reads either part.
  ASSERT_TRUE(dt->state && dt->state->is(K::Tuple) && dt->state->items.size() == 2);
  auto local = dt->attr("_local_tensor");
  ASSERT_TRUE(local && local->is(K::Tensor));
  EXPECT_EQ(local.get(), dt->state->items[1]->get("_local_tensor").get());
  EXPECT_EQ(local->tensor->size, ref["local_shape"].get<std::vector<int64_t>>());
  EXPECT_EQ(local->tensor->stride, ref["local_stride"].get<std::vector<int64_t>>());
  EXPECT_EQ(local->tensor->storage_offset, ref["offset"].get<int64_t>());
  EXPECT_EQ(local->tensor->dtype, DType::F32);

  auto spec = dt->attr("_spec");
  ASSERT_TRUE(spec && spec->is(K::Object));
  EXPECT_TRUE(spec->str.ends_with(".DTensorSpec")) << spec->str;
  auto placements = spec->attr("placements");
  ASSERT_TRUE(placements && placements->is(K::Tuple));
  std::vector<int64_t> dims;
  for (const auto& p : placements->items) {
    EXPECT_TRUE(p->is(K::Object) && p->str.ends_with(".Shard")) << p->repr();
    dims.push_back(p->attr("dim")->as_int());
  }
  EXPECT_EQ(dims, ref["dims"].get<std::vector<int64_t>>());

  // TensorMeta is a namedtuple: NEWOBJ with args (torch.Size -> Tuple, stride, dtype).
  auto tm = spec->attr("tensor_meta");
  ASSERT_TRUE(tm && tm->is(K::Object) && tm->str.ends_with(".TensorMeta")) << (tm ? tm->repr() : "");
  ASSERT_TRUE(tm->attr("shape") && tm->attr("shape")->is(K::Tuple));
  EXPECT_EQ(tm->attr("shape").get(), tm->args->items[0].get());
  std::vector<int64_t> gshape;
  for (const auto& s : tm->attr("shape")->items) gshape.push_back(s->as_int());
  EXPECT_EQ(gshape, ref["global_shape"].get<std::vector<int64_t>>());
  EXPECT_EQ(canon(*tm->attr("stride")), "(i3;i1;)");
  EXPECT_EQ(tm->attr("dtype")->str, "torch.float32");

  auto mesh = spec->attr("mesh");
  ASSERT_TRUE(mesh && mesh->is(K::Object) && mesh->str.ends_with(".DeviceMesh")) << (mesh ? mesh->repr() : "");
  auto names = mesh->attr("mesh_dim_names") ? mesh->attr("mesh_dim_names") : mesh->attr("_mesh_dim_names");
  ASSERT_TRUE(names && names->is(K::Tuple));
  std::vector<std::string> got_names;
  for (const auto& n : names->items) got_names.push_back(n->as_str());
  EXPECT_EQ(got_names, ref["mesh_dim_names"].get<std::vector<std::string>>());
  std::vector<int64_t> mesh_shape;
  if (auto mt = mesh->attr("mesh")) {  // torch <= 2.8: a tensor of ranks
    ASSERT_TRUE(mt->is(K::Tensor));
    mesh_shape = mt->tensor->size;
  } else {  // torch >= 2.9: _MeshLayout(shape, stride) over a flat _rank_map tensor
    auto layout = mesh->attr("_layout");
    ASSERT_TRUE(layout && layout->attr("shape")) << mesh->repr(3);
    for (const auto& s : layout->attr("shape")->items) mesh_shape.push_back(s->as_int());
    ASSERT_TRUE(mesh->attr("_rank_map") && mesh->attr("_rank_map")->is(K::Tensor));
    EXPECT_EQ(mesh->attr("_rank_map")->tensor->dtype, DType::I32);
  }
  EXPECT_EQ(mesh_shape, ref["mesh_shape"].get<std::vector<int64_t>>());
}

TEST(Pickle, DistributedCheckpointMetadata) {
  TempDir dir;
  test::run_python(R"PY(
import json, torch, torch.distributed.checkpoint as dcp, warnings
warnings.simplefilter('ignore')
D = ')PY" + dir.path.string() + R"PY('
sd = {'a': torch.arange(6.).reshape(2, 3), 'b': {'c': torch.ones(4, dtype=torch.bfloat16)}, 'n': 5}
dcp.save(sd, checkpoint_id=f'{D}/ckpt')
md = dcp.FileSystemReader(f'{D}/ckpt').read_metadata()
out = {'tensors': {}, 'storage': []}
for fqn, m in md.state_dict_metadata.items():
    if hasattr(m, 'chunks'):
        out['tensors'][fqn] = dict(size=list(m.size), dtype=str(m.properties.dtype),
                                   chunks=[[list(c.offsets), list(c.sizes)] for c in m.chunks])
    else:
        out['tensors'][fqn] = None
for k, v in md.storage_data.items():
    out['storage'].append([k.fqn, None if k.offset is None else list(k.offset), k.index, v.relative_path, v.offset, v.length])
json.dump(out, open(f'{D}/desc.json', 'w'))
)PY",
                   dir.path.string());
  const json ref = json::parse(slurp(dir / "desc.json"));
  ValuePtr md = parse_file(dir / "ckpt/.metadata");
  ASSERT_TRUE(md->is(K::Object) && md->str == "torch.distributed.checkpoint.metadata.Metadata") << md->repr();
  auto sdm = md->attr("state_dict_metadata");
  ASSERT_TRUE(sdm && sdm->is(K::Dict));
  ASSERT_EQ(sdm->dict_size(), ref["tensors"].size());
  for (const auto& [fqn, d] : ref["tensors"].items()) {
    SCOPED_TRACE(fqn);
    auto m = sdm->get(fqn);
    ASSERT_TRUE(m && m->is(K::Object));
    if (d.is_null()) {
      EXPECT_TRUE(m->str.ends_with(".BytesStorageMetadata"));
      continue;
    }
    std::vector<int64_t> size;
    for (const auto& s : m->attr("size")->items) size.push_back(s->as_int());
    EXPECT_EQ(size, d["size"].get<std::vector<int64_t>>());
    // TensorProperties has a tuple BUILD state; attr() names its fields.
    EXPECT_EQ(m->attr("properties")->attr("dtype")->str, d["dtype"].get<std::string>());
    EXPECT_EQ(m->attr("properties")->attr("requires_grad")->kind, K::Bool);
    auto chunks = m->attr("chunks");
    ASSERT_TRUE(chunks && chunks->is(K::List));
    ASSERT_EQ(chunks->items.size(), d["chunks"].size());
    for (size_t i = 0; i < chunks->items.size(); ++i) {
      std::vector<int64_t> off, sz;
      for (const auto& x : chunks->items[i]->attr("offsets")->items) off.push_back(x->as_int());
      for (const auto& x : chunks->items[i]->attr("sizes")->items) sz.push_back(x->as_int());
      EXPECT_EQ(off, d["chunks"][i][0].get<std::vector<int64_t>>());
      EXPECT_EQ(sz, d["chunks"][i][1].get<std::vector<int64_t>>());
    }
  }
  auto sdata = md->attr("storage_data");
  ASSERT_TRUE(sdata && sdata->is(K::Dict));
  ASSERT_EQ(sdata->dict_size(), ref["storage"].size());
  for (size_t i = 0; i < sdata->dict_size(); ++i) {
    const auto& key = sdata->items[2 * i];
    const auto& info = sdata->items[2 * i + 1];
    const auto& r = ref["storage"][i];
    EXPECT_TRUE(key->str.ends_with(".MetadataIndex"));
    EXPECT_EQ(key->attr("fqn")->as_str(), r[0].get<std::string>());
    if (r[1].is_null()) {
      EXPECT_TRUE(!key->attr("offset") || key->attr("offset")->is(K::None));  // may be omitted
    } else {
      std::vector<int64_t> off;
      for (const auto& x : key->attr("offset")->items) off.push_back(x->as_int());
      EXPECT_EQ(off, r[1].get<std::vector<int64_t>>());
    }
    if (r[2].is_null()) EXPECT_TRUE(key->attr("index")->is(K::None));
    else EXPECT_EQ(key->attr("index")->as_int(), r[2].get<int64_t>());
    EXPECT_EQ(info->attr("relative_path")->as_str(), r[3].get<std::string>());
    EXPECT_EQ(info->attr("offset")->as_int(), r[4].get<int64_t>());
    EXPECT_EQ(info->attr("length")->as_int(), r[5].get<int64_t>());
  }
  auto cid = md->attr("storage_meta") ? md->attr("storage_meta")->attr("checkpoint_id") : nullptr;
  ASSERT_TRUE(cid && cid->is(K::Object) && cid->str == "pathlib.PosixPath") << md->repr(3);
}

TEST(Pickle, Protocol5Dataclasses) {
  TempDir dir;
  test::run_python(R"PY(
import dataclasses, pathlib, pickle
D = ')PY" + dir.path.string() + R"PY('
@dataclasses.dataclass
class Chunk:
    offsets: tuple
    sizes: tuple
@dataclasses.dataclass(frozen=True)
class Index:
    fqn: str
    index: int = None
class Slotted:
    __slots__ = ('a', 'b')
    def __init__(self): self.a, self.b = 1, [2]
c = Chunk((0, 4), (4, 4))
obj = {'chunks': [c, c, Chunk((4, 0), (4, 4))], 'index': {Index('w', 3): 'x'},
       'path': pathlib.PosixPath('/tmp/some dir/f.bin'), 'slotted': Slotted(), 'ba': bytearray(b'\x01\x02')}
open(f'{D}/p5.pkl', 'wb').write(pickle.dumps(obj, protocol=5))
)PY",
                   dir.path.string());
  ValuePtr root = parse_file(dir / "p5.pkl");
  auto chunks = root->get("chunks");
  ASSERT_TRUE(chunks && chunks->items.size() == 3);
  EXPECT_EQ(chunks->items[0].get(), chunks->items[1].get());  // MEMOIZE + BINGET
  EXPECT_EQ(chunks->items[0]->str, "__main__.Chunk");
  EXPECT_EQ(canon(*chunks->items[2]->attr("offsets")), "(i4;i0;)");
  auto index = root->get("index");
  ASSERT_TRUE(index && index->dict_size() == 1);
  EXPECT_EQ(index->items[0]->attr("fqn")->as_str(), "w");
  EXPECT_EQ(index->items[0]->attr("index")->as_int(), 3);
  auto path = root->get("path");
  ASSERT_TRUE(path && path->is(K::Object) && path->str == "pathlib.PosixPath");
  std::string joined;
  for (const auto& p : path->args->items) joined += p->as_str() + "|";
  EXPECT_TRUE(joined == "/|tmp|some dir|f.bin|" || joined == "/tmp/some dir/f.bin|") << joined;
  auto slotted = root->get("slotted");
  EXPECT_EQ(slotted->attr("a")->as_int(), 1);
  EXPECT_EQ(canon(*slotted->attr("b")), "[i2;]");
  EXPECT_EQ(canon(*root->get("ba")), "b2:0102;");
}

TEST(Pickle, NestedClassViaGetattrStaysInert) {
  // Protocol 2 pickles a nested class as getattr(Outer, 'Inner') (as ShardedTensor's
  // ProcessGroupState is): it must become a class name, and its instance an inert record.
  TempDir dir;
  test::run_python(R"PY(
import pickle
D = ')PY" + dir.path.string() + R"PY('
class Outer:
    class Inner:
        def __init__(self): self.rank = 3
obj = {'x': Outer.Inner()}
data = pickle.dumps(obj, protocol=2)
assert b'getattr' in data, data
open(f'{D}/nested.pkl', 'wb').write(data)
)PY",
                   dir.path.string());
  ValuePtr root = parse_file(dir / "nested.pkl");
  auto x = root->get("x");
  ASSERT_TRUE(x && x->is(K::Object));
  EXPECT_EQ(x->str, "__main__.Outer.Inner");
  EXPECT_EQ(x->attr("rank")->as_int(), 3);
}

// ---- hand-written streams ---------------------------------------------------------------

std::string P2(const std::string& body) { return std::string("\x80\x02", 2) + body; }
const std::string Z(1, '\0');
std::string u32(uint32_t n) { return {char(n), char(n >> 8), char(n >> 16), char(n >> 24)}; }
std::string bu(const std::string& s) { return "X" + u32(static_cast<uint32_t>(s.size())) + s; }  // BINUNICODE
std::string storage_pid(const std::string& cls) {  // MARK 'storage' GLOBAL cls '0' 'cpu' 1 TUPLE BINPERSID
  return "(" + bu("storage") + "c" + cls + "\n" + bu("k") + bu("cuda:1") + "K\x06tQ";
}

void expect_error(const std::string& bytes, const std::string& needle, const PickleLimits& lim = {}) {
  try {
    parse_pickle(bytes, "test.pkl", nullptr, lim);
    ADD_FAILURE() << "no error; expected '" << needle << "'";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("test.pkl"), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

TEST(Pickle, LongEncodings) {
  auto val = [](const std::string& body) { return parse_pickle(P2(body + "."), "t"); };
  EXPECT_EQ(val("\x8a\x00"s)->as_int(), 0);
  EXPECT_EQ(val(std::string("\x8a\x01\xff", 3))->as_int(), -1);
  EXPECT_EQ(val("\x8a\x02\x00\x80"s)->as_int(), -32768);
  EXPECT_EQ(val("\x8a\x03\x00\x80\x00"s)->as_int(), 32768);
  EXPECT_EQ(val(std::string("\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", 10))->as_int(), INT64_MAX);
  EXPECT_EQ(val("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"s)->as_int(), INT64_MIN);
  EXPECT_EQ(val(std::string("\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11))->as_int(), -1);
  EXPECT_EQ(val("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00"s)->str, "builtins.int");  // 2^63
  EXPECT_EQ(val("\x8b\x02\x00\x00\x00\x34\x12"s)->as_int(), 0x1234);
  EXPECT_EQ(val("L-12345678901L\n")->as_int(), -12345678901);
  EXPECT_EQ(val("I42\n")->as_int(), 42);
  EXPECT_TRUE(val("I01\n")->b);
  EXPECT_EQ(val("L123456789012345678901234567890L\n")->str, "builtins.int");
}

TEST(Pickle, MalformedInput) {
  expect_error("", "no STOP");
  expect_error(P2(std::string("\xff.", 2)), "unknown opcode 0xff");
  expect_error(P2(std::string("\xff.", 2)), "byte 2");
  expect_error(P2("a."), "underflow");
  expect_error(P2("N(\x86."), "underflow");  // TUPLE2 may not pop across a MARK
  expect_error(P2("t."), "MARK");
  expect_error(P2("h\x05."), "memo key 5");
  expect_error(P2("X" + u32(16) + "abc"), "truncated");
  expect_error(P2("X\xff\xff\xff\x7f"), "exceeds");
  expect_error(P2(std::string("\x8d\xff\xff\xff\xff\xff\xff\xff\x7f", 9)), "exceeds");
  expect_error(P2("\x95\xff\xff" + std::string(6, '\0') + "N."), "FRAME");
  expect_error(P2("\x82\x01."), "extension");
  expect_error(P2("\x97."), "out-of-band");
  expect_error(std::string("\x80\x09N.", 4), "protocol");
  expect_error(P2("]q" + Z + "h" + Z + "a."), "recursive");  // l = []; l.append(l)
  expect_error(P2("K\x01K\x02R."), "REDUCE");
  expect_error(P2("N\x8c\x01xQ."), "persistent id");  // not a storage tuple
  expect_error(P2(storage_pid("not\nreal") + "."), "non-torch storage");
  expect_error(P2(storage_pid("torch\nComplexFloatStorage") + "."), "unsupported storage type");
  const std::string rebuild = "ctorch._utils\n_rebuild_tensor_v2\n(" + storage_pid("torch\nFloatStorage");
  expect_error(P2(rebuild + "K\x00K\x02\x85K\x01K\x01\x86\x89}t"s + "R."), "dims");
  expect_error(P2(rebuild + "K\x00J\xff\xff\xff\xff\x85K\x01\x85\x89}t"s + "R."), "negative");
  expect_error(P2(rebuild + "K\x00t"s + "R."), "arguments");
  expect_error(P2("ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00K\x00K\x00t"s + "R."), "storage");
  // Every strict prefix of a valid pickle is an error, never a crash.
  const std::string ok = P2("}q" + Z + "(" + bu("a") + "q\x01]q\x02(K\x01G?\xf8" + std::string(6, '\0') + "e" + bu("b") + "h\x02u.");
  EXPECT_EQ(canon(*parse_pickle(ok, "ok")), "{s1:61;[i1;f3ff8000000000000;]s1:62;[i1;f3ff8000000000000;]}");
  for (size_t n = 0; n < ok.size(); ++n) EXPECT_THROW(parse_pickle(ok.substr(0, n), "prefix"), Error) << n;
}

TEST(Pickle, HostileNestingAndLimits) {
  const size_t N = 100000;
  expect_error(P2(std::string(N, ']') + std::string(N - 1, 'a') + "."), "nested deeper");
  expect_error(P2("N" + std::string(N, '\x85') + "."), "nested deeper");
  expect_error(P2(std::string(N, '(')), "MARKs nested");
  // A wide but shallow structure is fine; shared sub-trees are checked once.
  std::string wide = P2("]q" + Z);
  for (int i = 0; i < 300; ++i) wide += "h" + Z + "h" + Z + "\x86q" + Z;  // x = (x, x): 2^300 paths
  wide += ".";
  expect_error(wide, "nested deeper");  // 301 levels > 256
  PickleLimits deep;
  deep.max_depth = 1000;
  EXPECT_NO_THROW(parse_pickle(wide, "wide", nullptr, deep));
  PickleLimits few;
  few.max_items = 10;
  expect_error(P2(std::string(20, 'N') + "."), "items", few);
  few.max_items = 1000;
  few.max_memo = 2;
  expect_error(P2("Nq" + Z + "q\x01q\x02."), "memo", few);
  few.max_string = 3;
  expect_error(P2(bu("abcd") + "."), "exceeds", few);
}

TEST(Pickle, DictKeysReplaceAsInPython) {
  // {1: 'a'}; d[True] = 'b'; d[1.0] = 'c' -> one key, as Python's dict equality (1 == True == 1.0).
  auto small = parse_pickle(P2("}K\x01" + bu("a") + "s\x88" + bu("b") + "sG?\xf0" + std::string(6, '\0') + bu("c") + "s."), "t");
  EXPECT_EQ(canon(*small), "{i1;s1:63;}");
  // 40 string keys, then key 'k5' again: large dicts are indexed, same result.
  std::string big = "}(";
  for (int i = 0; i < 40; ++i) big += bu("k" + std::to_string(i)) + "K" + char(i);
  big += "u" + bu("k5") + "N" + "s.";
  auto d = parse_pickle(P2(big), "t");
  EXPECT_EQ(d->dict_size(), 40u);
  EXPECT_TRUE(d->get("k5")->is(K::None));
  EXPECT_EQ(d->get("k39")->as_int(), 39);
  // BUILD twice on an object merges the attribute dicts.
  auto o = parse_pickle(P2("c__main__\nC\n)\x81}" + bu("a") + "K\x01sb}" + bu("b") + "K\x02sb."), "t");
  EXPECT_EQ(o->attr("a")->as_int(), 1);
  EXPECT_EQ(o->attr("b")->as_int(), 2);
}

TEST(Pickle, PersistentLoadCallback) {
  // ('storage', torch.HalfStorage, 'k', 'cuda:1', 6) with a custom loader, then the default rule.
  const std::string pid = storage_pid("torch\nHalfStorage") + ".";
  int calls = 0;
  auto v = parse_pickle(P2(pid), "t", [&](const ValuePtr& p) {
    ++calls;
    EXPECT_EQ(p->items.size(), 5u);
    auto s = std::make_shared<Value>();
    s->kind = K::Str;
    s->str = "loaded";
    return s;
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(v->str, "loaded");
  auto d = parse_pickle(P2(pid), "t");
  ASSERT_TRUE(d->is(K::Storage));
  EXPECT_EQ(d->storage->key, "k");
  EXPECT_EQ(d->storage->dtype, DType::F16);
  EXPECT_EQ(d->storage->location, "cuda:1");
  EXPECT_EQ(d->storage->numel, 6);
}

TEST(Pickle, TensorRefHelpers) {
  TensorRef t;
  t.size = {2, 3};
  t.stride = {3, 1};
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.numel(), 6);
  t.stride = {1, 2};
  EXPECT_FALSE(t.is_contiguous());
  t.size = {1, 3};
  t.stride = {99, 1};
  EXPECT_TRUE(t.is_contiguous());
  t.size = {0, 3};
  EXPECT_EQ(t.numel(), 0);
  t.size = {INT64_MAX, 3};
  EXPECT_THROW(t.numel(), Error);
}

}  // namespace
}  // namespace verl
