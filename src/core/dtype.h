// dtype.h — element types shared by safetensors, torch checkpoints and the merger,
// with their names in each format and exact (torch-identical) conversions between them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace verl {

enum class DType : uint8_t {
  BOOL, U8, I8, U16, I16, U32, I32, U64, I64,
  F16, BF16, F32, F64,
  F8_E4M3, F8_E5M2, F8_E4M3FNUZ, F8_E5M2FNUZ, F8_E8M0,
};

size_t dtype_size(DType t);
// safetensors header name ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_st_name(DType t);
std::optional<DType> dtype_from_st_name(const std::string& s);
// torch names: storage class ("FloatStorage") and dtype attribute ("float32", "bfloat16").
std::optional<DType> dtype_from_torch_storage(const std::string& cls);
std::optional<DType> dtype_from_torch_name(const std::string& name);
// Name used in HF config.json ("float32", "bfloat16", "float16").
const char* dtype_torch_name(DType t);
bool dtype_is_float(DType t);

// Convert n elements from src (type a) to dst (type b), rounding exactly as torch's
// Tensor.to() does on the CPU (round-to-nearest-even, NaN kept as NaN). Supports every
// pair among F16, BF16, F32, F64, and same-type copies for every type.
void convert(const void* src, DType a, void* dst, DType b, size_t n);
bool can_convert(DType a, DType b);

}  // namespace verl
