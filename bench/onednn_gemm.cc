// oneDNN's gemm as XLA FFI handlers, for bench/onednn_matmul.py: C = op(A) op(B) on row-major
// 2-D buffers, op a transpose where the attribute says so (oneDNN reads a transposed operand while
// packing it, so no transposed copy is made).
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// oneDNN's C API (libdnnl.so.3); declared here because its wheel ships no headers.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                          int64_t ldc);
extern "C" int dnnl_gemm_bf16bf16f32(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                                     const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                                     int64_t ldc);

// Aliases: a template argument list's comma would split the handler macros' arguments.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;

template <ffi::DataType T>
static ffi::Error Gemm(ffi::Buffer<T, 2> a, ffi::Buffer<T, 2> b, ffi::ResultBuffer<ffi::F32, 2> c, bool ta,
                       bool tb) {
  auto ad = a.dimensions(), bd = b.dimensions();
  int64_t M = ta ? ad[1] : ad[0], K = ta ? ad[0] : ad[1], N = tb ? bd[0] : bd[1];
  if ((tb ? bd[1] : bd[0]) != K) return ffi::Error::InvalidArgument("gemm: inner dimensions differ");
  int status = T == ffi::F32
      ? dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.f, reinterpret_cast<const float*>(a.untyped_data()),
                   ad[1], reinterpret_cast<const float*>(b.untyped_data()), bd[1], 0.f, c->typed_data(), N)
      : dnnl_gemm_bf16bf16f32(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.f, a.untyped_data(), ad[1],
                              b.untyped_data(), bd[1], 0.f, c->typed_data(), N);
  if (status != 0) return ffi::Error::Internal("oneDNN gemm returned an error status");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnSgemm, Gemm<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnGemmBf16, Gemm<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));
