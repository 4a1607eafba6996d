// test_dcp.cpp — the DCP reader against torch.distributed.checkpoint.save (run at test time):
// every dtype, a non-contiguous item, 0-d and empty tensors, byte items, both the torch.save
// and the safetensors item formats; and the Megatron → HF name table's row arithmetic
// (QKV grouped per KV head, gate/up halves, padded vocabulary, key forms, refusals).
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "io/dcp.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "merge/megatron_names.h"
#include "test_util.h"

namespace verl {
namespace {

using test::TempDir;

void check_against_torch(const std::string& format) {
  TempDir dir;
  test::run_python(R"PY(
import torch, warnings, torch.distributed.checkpoint as dcp, io
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat
from safetensors.torch import save_file
warnings.simplefilter('ignore')
D = ')PY" + dir.path.string() + R"PY('
fmt = ')PY" + format + R"PY('
g = torch.Generator().manual_seed(3)
sd = {
  'f32': torch.randn(5, 7, generator=g),
  'bf16': torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
  'f16': torch.randn(9, generator=g).to(torch.float16),
  'i64': torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
  'scalar': torch.tensor(2.5),
  'empty': torch.zeros(0, 3),
  'nested': {'w': torch.randn(4, 6, generator=g)},
}
if fmt == 'torch':
  sd['transposed'] = torch.randn(6, 4, generator=g).t()  # a non-contiguous item
  sd['blob'] = io.BytesIO(b'not a tensor')
w = FileSystemWriter(D + '/ckpt', serialization_format=SerializationFormat.SAFETENSORS if fmt == 'st' else SerializationFormat.TORCH_SAVE)
dcp.save(sd, storage_writer=w)
flat = {k: v for k, v in sd.items() if torch.is_tensor(v)}
flat['nested.w'] = sd['nested']['w']
save_file({k: v.contiguous() for k, v in flat.items()}, D + '/ref.safetensors')
)PY",
                   dir.path.string());
  DcpCheckpoint ck(dir / "ckpt");
  SafetensorsReader ref(dir / "ref.safetensors");
  size_t n = 0;
  for (const auto& rt : ref.tensors()) {
    SCOPED_TRACE(rt.name);
    const DcpTensor* t = ck.find(rt.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, rt.dtype);
    EXPECT_EQ(t->size, rt.shape);
    std::vector<uint8_t> got(rt.nbytes() + 1);
    ck.read_tensor(*t, got.data());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(rt), rt.nbytes()), 0);
    ++n;
  }
  EXPECT_EQ(n, ck.tensors().size());
  if (format == "torch") {
    ASSERT_EQ(ck.byte_keys().size(), 1u);
    const std::string item = ck.read_bytes("blob");  // a torch.save archive of the object
    EXPECT_EQ(item.substr(0, 2), "PK");
    EXPECT_NE(item.find("not a tensor"), std::string::npos);
  }
}

TEST(Dcp, TorchSaveItemsMatchTorch) { check_against_torch("torch"); }
TEST(Dcp, SafetensorsItemsMatchTorch) { check_against_torch("st"); }

TEST(Dcp, MissingMetadataIsAClearError) {
  TempDir dir;
  try {
    DcpCheckpoint ck(dir.path.string());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(".metadata"), std::string::npos) << e.what();
  }
}

MegatronModel model(const char* arch, int heads, int kv, int head_dim, int vocab = 10, int experts = 0) {
  nlohmann::ordered_json c = {{"architectures", {arch}}, {"hidden_size", 16}, {"num_hidden_layers", 3},
                              {"num_attention_heads", heads}, {"num_key_value_heads", kv}, {"head_dim", head_dim},
                              {"vocab_size", vocab}};
  if (experts) c["num_experts"] = experts;
  return MegatronModel(parse_model_config(c.dump(), "config.json", ConfigUse::Megatron), false, false);
}

TEST(MegatronNames, QkvIsGroupedPerKvHead) {
  // 4 query heads, 2 KV heads, head_dim 3: per group [q q; k; v] = 12 rows, 24 in all.
  const auto m = model("Qwen2ForCausalLM", 4, 2, 3);
  std::vector<NamedView> v;
  ASSERT_TRUE(megatron_to_hf("decoder.layers.1.self_attention.linear_qkv.weight", {24, 16}, m, &v));
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].name, "model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(v[0].rows, (std::vector<std::pair<int64_t, int64_t>>{{0, 6}, {12, 18}}));
  EXPECT_EQ(v[1].rows, (std::vector<std::pair<int64_t, int64_t>>{{6, 9}, {18, 21}}));
  EXPECT_EQ(v[2].name, "model.layers.1.self_attn.v_proj.weight");
  EXPECT_EQ(v[2].rows, (std::vector<std::pair<int64_t, int64_t>>{{9, 12}, {21, 24}}));
  EXPECT_TRUE(v[0].lead.empty());
  EXPECT_THROW(megatron_to_hf("decoder.layers.1.self_attention.linear_qkv.weight", {25, 16}, m, &v), Error);
}

TEST(MegatronNames, StackedLayersGateUpAndVocab) {
  const auto m = model("LlamaForCausalLM", 4, 4, 4, 10);
  std::vector<NamedView> v;
  ASSERT_TRUE(megatron_to_hf("decoder.layers.mlp.linear_fc1.weight", {3, 20, 16}, m, &v));
  ASSERT_EQ(v.size(), 6u);  // 3 layers x (gate, up)
  EXPECT_EQ(v[3].name, "model.layers.1.mlp.up_proj.weight");
  EXPECT_EQ(v[3].lead, std::vector<int64_t>{1});
  EXPECT_EQ(v[3].rows, (std::vector<std::pair<int64_t, int64_t>>{{10, 20}}));
  EXPECT_THROW(megatron_to_hf("decoder.layers.mlp.linear_fc1.weight", {2, 20, 16}, m, &v), Error);  // 2 != 3 layers
  v.clear();
  ASSERT_TRUE(megatron_to_hf("embedding.word_embeddings.weight", {16, 16}, m, &v));  // padded 10 -> 16
  EXPECT_EQ(v[0].rows, (std::vector<std::pair<int64_t, int64_t>>{{0, 10}}));
  EXPECT_FALSE(megatron_to_hf("decoder.layers.self_attention.linear_proj._extra_state", {3}, m, &v));
  EXPECT_THROW(megatron_to_hf("decoder.layers.0.mystery.weight", {4}, m, &v), Error);
}

TEST(MegatronNames, ExpertKeyForms) {
  const auto m = model("Qwen3MoeForCausalLM", 4, 2, 4, 10, 4);
  std::vector<NamedView> v;
  ASSERT_TRUE(megatron_to_hf("decoder.layers.mlp.experts.experts.linear_fc2.weight", {3, 4, 16, 8}, m, &v));
  ASSERT_EQ(v.size(), 12u);
  EXPECT_EQ(v[5].name, "model.layers.1.mlp.experts.1.down_proj.weight");
  EXPECT_EQ(v[5].lead, (std::vector<int64_t>{1, 1}));
  v.clear();
  ASSERT_TRUE(megatron_to_hf("decoder.layers.2.mlp.experts.linear_fc1.weight3", {16, 16}, m, &v));
  EXPECT_EQ(v[1].name, "model.layers.2.mlp.experts.3.up_proj.weight");
  v.clear();
  ASSERT_TRUE(megatron_to_hf("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight", {16, 16}, m, &v));
  EXPECT_EQ(v[0].name, "model.layers.0.mlp.experts.2.gate_proj.weight");
  const auto mix = model("MixtralForCausalLM", 4, 2, 4, 10, 4);
  v.clear();
  ASSERT_TRUE(megatron_to_hf("decoder.layers.0.mlp.router.weight", {4, 16}, mix, &v));
  EXPECT_EQ(v[0].name, "model.layers.0.block_sparse_moe.gate.weight");
}

TEST(MegatronNames, UnsupportedArchitectureNamesTheSupported) {
  try {
    model("GPTNeoXForCausalLM", 4, 4, 4);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Qwen3MoeForCausalLM"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace verl
