// dtype.cpp — dtype names and torch-identical float conversions (see dtype.h).
#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace verl {

namespace {
struct Info {
  DType t;
  size_t size;
  const char* st;     // safetensors name
  const char* torch;  // torch dtype attribute name
  const char* storage;  // torch storage class name
};
const Info kInfo[] = {
    {DType::BOOL, 1, "BOOL", "bool", "BoolStorage"},
    {DType::U8, 1, "U8", "uint8", "ByteStorage"},
    {DType::I8, 1, "I8", "int8", "CharStorage"},
    {DType::U16, 2, "U16", "uint16", "UInt16Storage"},
    {DType::I16, 2, "I16", "int16", "ShortStorage"},
    {DType::U32, 4, "U32", "uint32", "UInt32Storage"},
    {DType::I32, 4, "I32", "int32", "IntStorage"},
    {DType::U64, 8, "U64", "uint64", "UInt64Storage"},
    {DType::I64, 8, "I64", "int64", "LongStorage"},
    {DType::F16, 2, "F16", "float16", "HalfStorage"},
    {DType::BF16, 2, "BF16", "bfloat16", "BFloat16Storage"},
    {DType::F32, 4, "F32", "float32", "FloatStorage"},
    {DType::F64, 8, "F64", "float64", "DoubleStorage"},
    {DType::F8_E4M3, 1, "F8_E4M3", "float8_e4m3fn", "Float8_e4m3fnStorage"},
    {DType::F8_E5M2, 1, "F8_E5M2", "float8_e5m2", "Float8_e5m2Storage"},
    {DType::F8_E4M3FNUZ, 1, "F8_E4M3FNUZ", "float8_e4m3fnuz", "Float8_e4m3fnuzStorage"},
    {DType::F8_E5M2FNUZ, 1, "F8_E5M2FNUZ", "float8_e5m2fnuz", "Float8_e5m2fnuzStorage"},
    {DType::F8_E8M0, 1, "F8_E8M0", "float8_e8m0fnu", "Float8_e8m0fnuStorage"},
};
const Info& info(DType t) { return kInfo[static_cast<int>(t)]; }

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// c10::BFloat16 round_to_nearest_even.
inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = f2u(f);
  uint32_t bias = ((u >> 16) & 1) + 0x7FFF;
  return static_cast<uint16_t>((u + bias) >> 16);
}
inline float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

// IEEE half <-> float with round-to-nearest-even (the FP16 library algorithm torch uses).
inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = u2f((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = u2f((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f2u(denormalized) : f2u(normalized));
  return u2f(result);
}

// Element i of a float buffer, widened exactly (to double for F64, else to float).
struct LoadF64 { static double at(const void* p, size_t i) { return static_cast<const double*>(p)[i]; } };
struct LoadF32 { static float at(const void* p, size_t i) { return static_cast<const float*>(p)[i]; } };
struct LoadBF16 { static float at(const void* p, size_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); } };
struct LoadF16 { static float at(const void* p, size_t i) { return f16_to_f32(static_cast<const uint16_t*>(p)[i]); } };

template <class T, class Load, class Store>
void load_loop(const void* p, size_t n, Store store) {
  for (size_t i = 0; i < n; ++i) store(i, static_cast<T>(Load::at(p, i)));
}

// Calls store(i, x) with each element i of float type `t` as T (float, or double for a double
// destination), dispatching on the source type once per call, not per element.
template <class T, class Store>
void load_each(const void* p, DType t, size_t n, Store store) {
  switch (t) {
    case DType::F64: return load_loop<T, LoadF64>(p, n, store);
    case DType::F32: return load_loop<T, LoadF32>(p, n, store);
    case DType::BF16: return load_loop<T, LoadBF16>(p, n, store);
    case DType::F16: return load_loop<T, LoadF16>(p, n, store);
    default: return;
  }
}
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
const char* dtype_st_name(DType t) { return info(t).st; }
const char* dtype_torch_name(DType t) { return info(t).torch; }
bool dtype_is_float(DType t) {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64;
}

std::optional<DType> dtype_from_st_name(const std::string& s) {
  for (const auto& i : kInfo)
    if (s == i.st) return i.t;
  return std::nullopt;
}
std::optional<DType> dtype_from_torch_storage(const std::string& cls) {
  for (const auto& i : kInfo)
    if (cls == i.storage) return i.t;
  return std::nullopt;
}
std::optional<DType> dtype_from_torch_name(const std::string& name) {
  for (const auto& i : kInfo)
    if (name == i.torch) return i.t;
  if (name == "float" ) return DType::F32;
  if (name == "half") return DType::F16;
  if (name == "double") return DType::F64;
  if (name == "long") return DType::I64;
  if (name == "int") return DType::I32;
  if (name == "short") return DType::I16;
  return std::nullopt;
}

bool can_convert(DType a, DType b) { return a == b || (dtype_is_float(a) && dtype_is_float(b)); }

void convert(const void* src, DType a, void* dst, DType b, size_t n) {
  if (a == b) {
    std::memcpy(dst, src, n * dtype_size(a));
    return;
  }
  if (!can_convert(a, b))
    fail("cannot convert ", dtype_st_name(a), " to ", dtype_st_name(b));
  // Through float (double for a double destination), rounded as c10 rounds.
  auto* h = static_cast<uint16_t*>(dst);
  switch (b) {
    case DType::F64: return load_each<double>(src, a, n, [&](size_t i, double x) { static_cast<double*>(dst)[i] = x; });
    case DType::F32: return load_each<float>(src, a, n, [&](size_t i, float x) { static_cast<float*>(dst)[i] = x; });
    case DType::BF16: return load_each<float>(src, a, n, [&](size_t i, float x) { h[i] = f32_to_bf16(x); });
    case DType::F16: return load_each<float>(src, a, n, [&](size_t i, float x) { h[i] = f32_to_f16(x); });
    default: fail("cannot convert ", dtype_st_name(a), " to ", dtype_st_name(b));
  }
}

}  // namespace verl
