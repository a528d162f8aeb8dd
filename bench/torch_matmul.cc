// PyTorch's CPU products as XLA FFI handlers, for bench/torch_matmul.py: C = op(A) op(B) from row-major
// 2-D buffers of one dtype, op a transpose where the attribute says so, by ATen's mm into the result
// buffer. ATen reads a transposed operand in place (a strided view, no copy) and picks the kernel:
// MKL's sgemm in float32, oneDNN's matmul primitive in bfloat16 (AMX kernels on an AMX CPU), both as
// they ship inside libtorch_cpu. A bfloat16 result is the float32 sum rounded once.
#include <cstdint>
#include <exception>
#include <string>

#include <ATen/ATen.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Aliases: a template argument list's comma would split the handler macros' arguments.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;

// [rows, cols] over `data`, stored row-major, or stored as its transpose [cols, rows].
static at::Tensor View(void* data, int64_t rows, int64_t cols, bool transposed, at::ScalarType type) {
  auto options = at::TensorOptions().dtype(type);
  return transposed ? at::from_blob(data, {rows, cols}, {1, rows}, options)
                    : at::from_blob(data, {rows, cols}, {cols, 1}, options);
}

template <typename Matrix2D, typename Result>
static ffi::Error Mm(Matrix2D a, Matrix2D b, Result c, bool ta, bool tb, at::ScalarType type) {
  auto ad = a.dimensions(), bd = b.dimensions();
  int64_t M = ta ? ad[1] : ad[0], K = ta ? ad[0] : ad[1], N = tb ? bd[0] : bd[1];
  if ((tb ? bd[1] : bd[0]) != K) return ffi::Error::InvalidArgument("torch mm: inner dimensions differ");
  try {
    at::Tensor out = View(c->untyped_data(), M, N, false, type);
    at::mm_out(out, View(a.untyped_data(), M, K, ta, type), View(b.untyped_data(), K, N, tb, type));
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("torch mm: ") + e.what());
  }
  return ffi::Error::Success();
}

static ffi::Error MmF32(F32Matrix a, F32Matrix b, ffi::ResultBuffer<ffi::F32, 2> c, bool ta, bool tb) {
  return Mm(a, b, c, ta, tb, at::kFloat);
}

static ffi::Error MmBf16(Bf16Matrix a, Bf16Matrix b, ffi::ResultBuffer<ffi::BF16, 2> c, bool ta, bool tb) {
  return Mm(a, b, c, ta, tb, at::kBFloat16);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TorchMmF32, MmF32,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TorchMmBf16, MmBf16,
                              ffi::Ffi::Bind()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<Bf16Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));
