// torch_dtype.cpp — see torch_dtype.h.
#include "model/torch_dtype.h"

#include <ATen/ATen.h>

#include <cstring>

#include "core/error.h"
#include "io/safetensors.h"

namespace verl {

at::ScalarType to_scalar_type(DType t, const std::string& where) {
  switch (t) {
    case DType::BOOL: return at::kBool;
    case DType::U8: return at::kByte;
    case DType::I8: return at::kChar;
    case DType::I16: return at::kShort;
    case DType::I32: return at::kInt;
    case DType::I64: return at::kLong;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::F32: return at::kFloat;
    case DType::F64: return at::kDouble;
    default: fail(where, ": unsupported dtype ", dtype_st_name(t));
  }
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: return DType::BOOL;
    case at::kByte: return DType::U8;
    case at::kChar: return DType::I8;
    case at::kShort: return DType::I16;
    case at::kInt: return DType::I32;
    case at::kLong: return DType::I64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    default: fail("unsupported torch dtype ", c10::toString(t));
  }
}

at::Tensor read_st_tensor(const SafetensorsReader& r, const StTensor& t) {
  at::Tensor x = at::empty(t.shape, at::TensorOptions().dtype(to_scalar_type(t.dtype, r.path() + ": '" + t.name + "'")));
  std::memcpy(x.data_ptr(), r.data(t), t.nbytes());
  r.release(t);
  return x;
}

}  // namespace verl
