// torch_dtype.h — the one bridge between the torch-free element types (core/dtype.h) and
// libtorch's scalar types, and safetensors entries copied out as tensors.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "core/dtype.h"

namespace verl {

class SafetensorsReader;
struct StTensor;

// Every type both sides have (bool, integers, fp16 / bf16 / fp32 / fp64); others throw an Error
// that names `where` and the type.
at::ScalarType to_scalar_type(DType t, const std::string& where);
DType to_dtype(at::ScalarType t);

// A copy of one safetensors entry (its own dtype and shape); the mapped pages are released.
at::Tensor read_st_tensor(const SafetensorsReader& r, const StTensor& t);

}  // namespace verl
