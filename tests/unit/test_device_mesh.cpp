// test_device_mesh.cpp — DeviceMesh / DTensor decoding by meaning (checkpoint-formats.md §3),
// on pickled-object trees built by hand for each layout torch has used, so that every
// variant (and the rank order it implies) is pinned down independently of the pinned torch.
// Real files of each release are covered by tests/compat (test_compat_corpus).
#include <gtest/gtest.h>

#include <map>

#include "core/error.h"
#include "io/torch_checkpoint.h"
#include "test_util.h"

using namespace verl;

namespace {

ValuePtr V(Value::Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}
ValuePtr I(int64_t i) {
  auto v = V(Value::Kind::Int);
  v->i = i;
  return v;
}
ValuePtr S(const std::string& s) {
  auto v = V(Value::Kind::Str);
  v->str = s;
  return v;
}
ValuePtr T(std::vector<ValuePtr> items) {
  auto v = V(Value::Kind::Tuple);
  v->items = std::move(items);
  return v;
}
ValuePtr Ints(std::vector<int64_t> xs) {
  std::vector<ValuePtr> it;
  for (auto x : xs) it.push_back(I(x));
  return T(it);
}
ValuePtr D(std::vector<std::pair<std::string, ValuePtr>> kv) {
  auto v = V(Value::Kind::Dict);
  for (auto& [k, x] : kv) {
    v->items.push_back(S(k));
    v->items.push_back(x);
  }
  return v;
}
// An inert object as NEWOBJ + BUILD leave it: class name + state dict.
ValuePtr Obj(const std::string& cls, std::vector<std::pair<std::string, ValuePtr>> state) {
  auto v = V(Value::Kind::Object);
  v->str = cls;
  v->state = D(std::move(state));
  return v;
}
// An integer tensor whose values the test's reader returns.
std::map<std::string, std::vector<int64_t>> g_ints;
ValuePtr IntTensor(const std::string& key, std::vector<int64_t> values, std::vector<int64_t> size) {
  auto v = V(Value::Kind::Tensor);
  v->tensor = std::make_shared<TensorRef>();
  v->tensor->storage.key = key;
  v->tensor->storage.dtype = v->tensor->dtype = DType::I64;
  v->tensor->size = size;
  g_ints[key] = std::move(values);
  return v;
}
std::vector<int64_t> read(const TensorRef& t) { return g_ints.at(t.storage.key); }

const char* kMesh = "torch.distributed.device_mesh.DeviceMesh";
const char* kLayout = "torch.distributed._mesh_layout._MeshLayout";
const char* kFlat = "torch.distributed._mesh_layout._FlatLayout";

ValuePtr Flat(std::vector<int64_t> shape, std::vector<int64_t> stride) {
  return Obj(kFlat, {{"shape", Ints(shape)}, {"stride", Ints(stride)}});
}

std::string error_of(const Value& mesh) {
  return verl::test::error_of([&] { decode_device_mesh(mesh, "f.pt: key 'w'", read); });
}

TEST(DeviceMesh, Torch24To29MeshTensor) {
  // 2.4: _parent_mesh / _dim_group_infos; the rank tensor is the mesh.
  auto m = Obj(kMesh, {{"device_type", S("cpu")},
                       {"mesh", IntTensor("m24", {0, 1, 2, 3}, {2, 2})},
                       {"mesh_dim_names", T({S("ddp"), S("fsdp")})},
                       {"_parent_mesh", V(Value::Kind::None)},
                       {"_coordinate_on_dim", Ints({1, 0})}});
  MeshInfo mi = decode_device_mesh(*m, "f", read);
  EXPECT_EQ(mi.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(mi.dim_names, (std::vector<std::string>{"ddp", "fsdp"}));
  EXPECT_EQ(mi.ranks, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(mi.file_rank, 2);  // coordinate (1, 0) of a 2x2 mesh
  EXPECT_EQ(mi.rank_source, "DeviceMesh._coordinate_on_dim");
}

TEST(DeviceMesh, Torch210To212ShapeStride) {
  // A transposed layout: stride (1, 2) over rank map [10, 11, 12, 13] gives rows [10, 12], [11, 13].
  auto m = Obj(kMesh, {{"_device_type", S("cpu")},
                       {"_layout", Obj(kLayout, {{"shape", Ints({2, 2})}, {"stride", Ints({1, 2})}})},
                       {"_rank_map", IntTensor("m211", {10, 11, 12, 13}, {4})},
                       {"_mesh_dim_names", T({S("ddp"), S("fsdp")})},
                       {"_root_mesh", V(Value::Kind::None)},
                       {"_rank", I(12)},
                       {"_coordinate_on_dim", Ints({0, 1})}});
  MeshInfo mi = decode_device_mesh(*m, "f", read);
  EXPECT_EQ(mi.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(mi.ranks, (std::vector<int64_t>{10, 12, 11, 13}));
  EXPECT_EQ(mi.file_rank, 12);  // _rank wins over the coordinate
  EXPECT_EQ(mi.rank_source, "DeviceMesh._rank");
  // 2.10: no _rank, the coordinate (0, 1) names ranks[1] = 12.
  auto m210 = Obj(kMesh, {{"_layout", Obj(kLayout, {{"shape", Ints({2, 2})}, {"stride", Ints({1, 2})}})},
                          {"_rank_map", IntTensor("m210", {10, 11, 12, 13}, {4})},
                          {"_coordinate_on_dim", Ints({0, 1})}});
  EXPECT_EQ(decode_device_mesh(*m210, "f", read).file_rank, 12);
  // A 1-D mesh whose shape is a bare integer.
  auto m1 = Obj(kMesh, {{"_layout", Obj(kLayout, {{"shape", I(3)}, {"stride", I(1)}})},
                        {"_rank_map", IntTensor("m1", {0, 1, 2}, {3})}});
  EXPECT_EQ(decode_device_mesh(*m1, "f", read).ranks, (std::vector<int64_t>{0, 1, 2}));
}

TEST(DeviceMesh, Torch213AxesOfFlatLayouts) {
  auto m = Obj(kMesh, {{"_layout", Obj(kLayout, {{"axes", T({Flat({2}, {2}), Flat({2}, {1})})}})},
                       {"_rank_map", IntTensor("m213", {0, 1, 2, 3}, {4})},
                       {"_mesh_dim_names", T({S("ddp"), S("fsdp")})},
                       {"_rank", I(3)},
                       {"_preserve_rank_order", V(Value::Kind::Bool)}});
  MeshInfo mi = decode_device_mesh(*m, "f", read);
  EXPECT_EQ(mi.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(mi.ranks, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(mi.file_rank, 3);
}

TEST(DeviceMesh, Torch213NonAdjacentFlattenAndSizeOneDim) {
  // Dim 0 flattens two modes (shape (2,2), stride (4,1)), dim 1 is (2,) stride (2,), dim 2 has
  // size 1 (shape (), stride ()). Row-major over (c0, c1, c2): index 4·c0 + c1 + 2·c2.
  std::vector<int64_t> map(8);
  for (int i = 0; i < 8; ++i) map[i] = 100 + i;
  auto m = Obj(kMesh, {{"_layout", Obj(kLayout, {{"axes", T({Flat({2, 2}, {4, 1}), Flat({2}, {2}), Flat({}, {})})}})},
                       {"_rank_map", IntTensor("mflat", map, {8})}});
  MeshInfo mi = decode_device_mesh(*m, "f", read);
  EXPECT_EQ(mi.shape, (std::vector<int64_t>{4, 2, 1}));
  std::vector<int64_t> want;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int c = 0; c < 2; ++c) want.push_back(100 + 4 * a + b + 2 * c);
  EXPECT_EQ(mi.ranks, want);
  EXPECT_EQ(mi.file_rank, -1);  // not recorded
}

TEST(DeviceMesh, SubMeshUsesItsRootsRankMap) {
  auto root = Obj(kMesh, {{"_layout", Obj(kLayout, {{"axes", T({Flat({2}, {2}), Flat({2}, {1})})}})},
                          {"_rank_map", IntTensor("root", {4, 5, 6, 7}, {4})}});
  auto sub = Obj(kMesh, {{"_layout", Obj(kLayout, {{"axes", T({Flat({2}, {1})})}})}, {"_root_mesh", root}});
  EXPECT_EQ(decode_device_mesh(*sub, "f", read).ranks, (std::vector<int64_t>{4, 5}));
}

TEST(DeviceMesh, UnknownLayoutsNameTheClassAndFields) {
  auto future = Obj("torch.distributed.device_mesh.DeviceMesh", {{"_topology", I(1)}, {"_ranks_v3", I(2)}});
  std::string m = error_of(*future);
  EXPECT_NE(m.find("f.pt: key 'w'"), std::string::npos) << m;
  EXPECT_NE(m.find("torch.distributed.device_mesh.DeviceMesh"), std::string::npos) << m;
  EXPECT_NE(m.find("_topology, _ranks_v3"), std::string::npos) << m;
  auto odd = Obj(kMesh, {{"_layout", Obj(kLayout, {{"modes", I(1)}})}, {"_rank_map", IntTensor("odd", {0}, {1})}});
  m = error_of(*odd);
  EXPECT_NE(m.find(kLayout), std::string::npos) << m;
  EXPECT_NE(m.find("modes"), std::string::npos) << m;
  auto no_map = Obj(kMesh, {{"_layout", Obj(kLayout, {{"shape", Ints({2})}, {"stride", Ints({1})}})}});
  EXPECT_NE(error_of(*no_map).find("_rank_map"), std::string::npos);
  auto outside = Obj(kMesh, {{"_layout", Obj(kLayout, {{"shape", Ints({4})}, {"stride", Ints({1})}})},
                             {"_rank_map", IntTensor("short", {0, 1}, {2})}});
  EXPECT_NE(error_of(*outside).find("rank map of 2"), std::string::npos);
}

// A whole DTensor: the tensor-subclass rebuild's state holds _local_tensor and _spec.
ValuePtr dtensor(const std::string& placement_module, bool shard_order, ValuePtr mesh) {
  auto local = V(Value::Kind::Tensor);
  local->tensor = std::make_shared<TensorRef>();
  local->tensor->storage.key = "0";
  local->tensor->dtype = local->tensor->storage.dtype = DType::F32;
  local->tensor->size = {3, 4};
  local->tensor->stride = {4, 1};
  auto shard = Obj(placement_module + ".Shard", {{"dim", I(0)}});
  auto size = V(Value::Kind::Object);
  size->str = "torch.Size";
  auto tm = V(Value::Kind::Object);
  tm->str = "torch.distributed.tensor._dtensor_spec.TensorMeta";
  tm->args = T({Ints({5, 4}), Ints({4, 1}), V(Value::Kind::Global)});
  std::vector<std::pair<std::string, ValuePtr>> spec = {{"mesh", mesh}, {"placements", T({shard})}, {"tensor_meta", tm}};
  if (shard_order) spec.push_back({"shard_order", T({})});
  auto dt = V(Value::Kind::Object);
  dt->str = "torch.distributed.tensor.DTensor";
  dt->state = T({V(Value::Kind::None), D({{"_local_tensor", local},
                                          {"_spec", Obj("torch.distributed.tensor._dtensor_spec.DTensorSpec", spec)}})});
  return dt;
}

TEST(DeviceMesh, DTensorBothPlacementModulesWithAndWithoutShardOrder) {
  auto mesh = Obj(kMesh, {{"mesh", IntTensor("dt", {0, 1}, {2})}, {"mesh_dim_names", T({S("fsdp")})},
                          {"_coordinate_on_dim", Ints({1})}});
  for (const char* mod : {"torch.distributed._tensor.placement_types", "torch.distributed.tensor.placement_types"})
    for (bool so : {false, true}) {
      SCOPED_TRACE(std::string(mod) + (so ? " with shard_order" : ""));
      CkptTensor t = decode_dtensor(*dtensor(mod, so, mesh), "w", "f.pt", read);
      ASSERT_TRUE(t.dtensor);
      EXPECT_EQ(t.dtensor->global_shape, (std::vector<int64_t>{5, 4}));
      ASSERT_EQ(t.dtensor->placements.size(), 1u);
      EXPECT_EQ(t.dtensor->placements[0].kind, Placement::Kind::Shard);
      EXPECT_EQ(t.dtensor->mesh_shape, (std::vector<int64_t>{2}));
      EXPECT_EQ(t.dtensor->file_rank, 1);
    }
}

TEST(DeviceMesh, DescribeValue) {
  EXPECT_EQ(describe_value(*I(7)), "an int");
  EXPECT_EQ(describe_value(*S("x")), "a str");
  EXPECT_EQ(describe_value(*V(Value::Kind::None)), "None");
  EXPECT_EQ(describe_value(*Obj("os.system", {})), "a os.system object");
}

}  // namespace
