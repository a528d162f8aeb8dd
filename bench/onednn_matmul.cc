// oneDNN's products as XLA FFI handlers, for bench/onednn_matmul.py: C = op(A) op(B) in float32 from
// row-major 2-D buffers, op a transpose where the attribute says so (oneDNN reads the transposed
// operand itself; no copy is made). float32: the gemm API (dnnl_sgemm). bfloat16: the matmul
// primitive, which on an AMX CPU runs AMX kernels (brgemm); the gemm API's bfloat16 does not.
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;

// Aliases: a template argument list's comma would split the handler macros' arguments.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;

static dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// [rows, cols] stored row-major, or stored as its transpose [cols, rows].
static dnnl::memory::desc Matrix(int64_t rows, int64_t cols, bool transposed, dt type) {
  return dnnl::memory::desc({rows, cols}, type,
                            transposed ? dnnl::memory::dims{1, rows} : dnnl::memory::dims{cols, 1});
}

// Creating a primitive compiles its kernels: once per shape and transposes.
static dnnl::matmul Bf16Primitive(int64_t M, int64_t K, int64_t N, bool ta, bool tb) {
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, dnnl::matmul> made;
  static std::mutex lock;
  std::lock_guard<std::mutex> hold(lock);
  auto key = std::make_tuple(M, K, N, ta, tb);
  auto found = made.find(key);
  if (found == made.end()) {
    dnnl::matmul::primitive_desc pd(Engine(), Matrix(M, K, ta, dt::bf16), Matrix(K, N, tb, dt::bf16),
                                    Matrix(M, N, false, dt::f32));
    found = made.emplace(key, dnnl::matmul(pd)).first;
  }
  return found->second;
}

// M, K, N of op(A) op(B); false where the inner dimensions differ.
template <typename Matrix2D>
static bool ProductDims(const Matrix2D& a, const Matrix2D& b, bool ta, bool tb, int64_t& M, int64_t& K, int64_t& N) {
  auto ad = a.dimensions(), bd = b.dimensions();
  M = ta ? ad[1] : ad[0], K = ta ? ad[0] : ad[1], N = tb ? bd[0] : bd[1];
  return (tb ? bd[1] : bd[0]) == K;
}

static ffi::Error Sgemm(F32Matrix a, F32Matrix b, ffi::ResultBuffer<ffi::F32, 2> c, bool ta, bool tb) {
  int64_t M, K, N;
  if (!ProductDims(a, b, ta, tb, M, K, N)) return ffi::Error::InvalidArgument("sgemm: inner dimensions differ");
  dnnl_status_t status = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.f, a.typed_data(), a.dimensions()[1],
                                    b.typed_data(), b.dimensions()[1], 0.f, c->typed_data(), N);
  if (status != dnnl_success) return ffi::Error::Internal("oneDNN sgemm returned an error status");
  return ffi::Error::Success();
}

static ffi::Error MatmulBf16(Bf16Matrix a, Bf16Matrix b, ffi::ResultBuffer<ffi::F32, 2> c, bool ta, bool tb) {
  int64_t M, K, N;
  if (!ProductDims(a, b, ta, tb, M, K, N)) return ffi::Error::InvalidArgument("matmul: inner dimensions differ");
  try {
    dnnl::stream stream(Engine());
    dnnl::memory am(Matrix(M, K, ta, dt::bf16), Engine(), a.untyped_data());
    dnnl::memory bm(Matrix(K, N, tb, dt::bf16), Engine(), b.untyped_data());
    dnnl::memory cm(Matrix(M, N, false, dt::f32), Engine(), c->untyped_data());
    Bf16Primitive(M, K, N, ta, tb).execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));
