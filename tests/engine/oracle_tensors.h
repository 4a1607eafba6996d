// oracle_tensors.h — helpers for the loss / optimizer tests: load every tensor of an oracle
// safetensors file (f32, f64, i64, u8) and compare tensors against verl / torch references
// with a relative tolerance (NaN equal to NaN), counting how many came out bit-identical.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "io/safetensors.h"

namespace verl::test {

inline std::map<std::string, at::Tensor> load_oracle_tensors(const std::string& path) {
  SafetensorsReader r(path);
  std::map<std::string, at::Tensor> m;
  for (const auto& t : r.tensors()) {
    at::ScalarType st;
    switch (t.dtype) {
      case DType::F32: st = at::kFloat; break;
      case DType::F64: st = at::kDouble; break;
      case DType::I64: st = at::kLong; break;
      case DType::U8: st = at::kByte; break;
      case DType::BOOL: st = at::kBool; break;
      default: throw std::runtime_error(path + ": unexpected dtype for " + t.name);
    }
    at::Tensor x = at::empty(t.shape, at::TensorOptions().dtype(st));
    if (t.nbytes()) std::memcpy(x.data_ptr(), r.data(t), t.nbytes());
    m[t.name] = x;
  }
  return m;
}

// Running tally over many comparisons: worst relative error and how many were exact.
struct Tally {
  double worst = 0;
  int exact = 0, total = 0;
  void print(const char* what) const {
    std::printf("%s: %d/%d bit-identical, worst relative difference %.3g\n", what, exact, total, worst);
  }
};

// |a − b| ≤ atol + rtol·|b| elementwise (NaN == NaN, inf == inf); records into `t`.
inline ::testing::AssertionResult close(const at::Tensor& got, const at::Tensor& want, Tally* t = nullptr,
                                        double rtol = 1e-6, double atol = 1e-7) {
  at::Tensor a = got.detach().to(at::kDouble).cpu().reshape({-1});
  at::Tensor b = want.detach().to(at::kDouble).cpu().reshape({-1});
  if (a.numel() != b.numel())
    return ::testing::AssertionFailure() << "numel " << a.numel() << " vs " << b.numel();
  const double* pa = a.data_ptr<double>();
  const double* pb = b.data_ptr<double>();
  bool exact = true;
  double worst = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    double x = pa[i], y = pb[i];
    if (std::isnan(x) && std::isnan(y)) continue;
    if (x == y) continue;
    exact = false;
    double d = std::abs(x - y);
    if (!(d <= atol + rtol * std::abs(y)))
      return ::testing::AssertionFailure() << "element " << i << ": got " << x << ", want " << y << " (diff " << d << ")";
    if (y != 0) worst = std::max(worst, d / std::abs(y));
  }
  if (t) {
    t->total++;
    t->exact += exact ? 1 : 0;
    t->worst = std::max(t->worst, worst);
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult close(double got, double want, Tally* t = nullptr, double rtol = 1e-6,
                                        double atol = 1e-7) {
  return close(at::scalar_tensor(got, at::kDouble), at::scalar_tensor(want, at::kDouble), t, rtol, atol);
}

}  // namespace verl::test
