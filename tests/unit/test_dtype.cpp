// test_dtype.cpp — dtype conversions must round exactly as torch's Tensor.to() does.
// torch converts a set of random and special values at test time; we compare bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <vector>

#include "core/dtype.h"
#include "merge/merger.h"
#include "test_util.h"

using namespace verl;

using test::slurp;

TEST(DType, ConversionsMatchTorchBitForBit) {
  test::TempDir dir;
  test::run_python(R"(
import torch, sys
d = sys.argv[0].rsplit('/', 1)[0]
g = torch.Generator().manual_seed(0)
x = torch.cat([torch.randn(100000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (100000,), generator=g),
               torch.tensor([0.0, -0.0, float('inf'), float('-inf'), float('nan'), 1e-45, 3e38, 65504.0, 65520.0,
                             6e-8, 1.0 + 2**-8, 1.0 + 2**-9 + 2**-20, 2.0**-24, 2.0**-25, 1e-40], dtype=torch.float64)])
x32 = x.float()
for name, t in {'f64': x, 'f32': x32, 'bf16': x32.bfloat16(), 'f16': x32.half(),
                'f32_bf16': x32.bfloat16(), 'f32_f16': x32.half(), 'f64_f32': x.float(),
                'bf16_f32': x32.bfloat16().float(), 'f16_f32': x32.half().float(),
                'bf16_f16': x32.bfloat16().half(), 'f16_bf16': x32.half().bfloat16(),
                'f64_bf16': x.bfloat16(), 'f64_f16': x.half(), 'f32_f64': x32.double()}.items():
    open(f'{d}/{name}.bin', 'wb').write(t.contiguous().view(torch.uint8).numpy().tobytes())
)",
                   dir.path.string());
  struct Case { const char* in; DType a; const char* out; DType b; };
  const Case cases[] = {
      {"f32", DType::F32, "f32_bf16", DType::BF16}, {"f32", DType::F32, "f32_f16", DType::F16},
      {"f64", DType::F64, "f64_f32", DType::F32},   {"bf16", DType::BF16, "bf16_f32", DType::F32},
      {"f16", DType::F16, "f16_f32", DType::F32},   {"bf16", DType::BF16, "bf16_f16", DType::F16},
      {"f16", DType::F16, "f16_bf16", DType::BF16}, {"f64", DType::F64, "f64_bf16", DType::BF16},
      {"f64", DType::F64, "f64_f16", DType::F16},   {"f32", DType::F32, "f32_f64", DType::F64},
  };
  for (const auto& c : cases) {
    auto in = slurp(dir / (std::string(c.in) + ".bin"));
    auto want = slurp(dir / (std::string(c.out) + ".bin"));
    const size_t n = in.size() / dtype_size(c.a);
    ASSERT_EQ(want.size(), n * dtype_size(c.b)) << c.out;
    std::vector<uint8_t> got(want.size());
    convert(in.data(), c.a, got.data(), c.b, n);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
      if (std::memcmp(&got[i * dtype_size(c.b)], &want[i * dtype_size(c.b)], dtype_size(c.b)) != 0) {
        // NaN payloads may differ; a NaN is a NaN.
        double g, w;
        convert(&got[i * dtype_size(c.b)], c.b, &g, DType::F64, 1);
        convert(&want[i * dtype_size(c.b)], c.b, &w, DType::F64, 1);
        if (g != g && w != w) continue;
        if (!bad) first = i;
        ++bad;
      }
    EXPECT_EQ(bad, 0u) << c.in << " -> " << c.out << ": first mismatch at element " << first;
  }
}

TEST(DType, Names) {
  EXPECT_EQ(*dtype_from_st_name("BF16"), DType::BF16);
  EXPECT_EQ(*dtype_from_torch_storage("FloatStorage"), DType::F32);
  EXPECT_EQ(*dtype_from_torch_name("bfloat16"), DType::BF16);
  EXPECT_FALSE(dtype_from_st_name("F33").has_value());
  EXPECT_EQ(dtype_size(DType::F8_E5M2), 1u);
}

TEST(ParseSize, UnitsLikeTransformers) {
  EXPECT_EQ(parse_size("5GB"), 5000000000ull);
  EXPECT_EQ(parse_size("2GiB"), 2147483648ull);
  EXPECT_EQ(parse_size("500MB"), 500000000ull);
  EXPECT_EQ(parse_size("123"), 123ull);
  EXPECT_THROW(parse_size("lots"), std::exception);
  EXPECT_THROW(parse_size("5XB"), std::exception);
}
