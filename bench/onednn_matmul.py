"""XLA:CPU's matmul against oneDNN's called from inside jit (a jax.ffi custom call).

    .venv/bin/python bench/onednn_matmul.py [--reps 7] [--chain 8]
    .venv/bin/python bench/onednn_matmul.py --run SCRIPT.py|-m MODULE [ARGS ...]

An experiment, not a path of the model: minilm's matmul stays XLA's (bench/README, "oneDNN through
jax.ffi"). Needs a C++ compiler and oneDNN 3.2 with its headers (`pip install
onednn-devel-cpu-gomp==2023.2.0`, which puts libdnnl.so.3 under the environment's lib/ and the
headers under include/); the handlers (bench/onednn_matmul.cc) are compiled into a temporary folder
at start.

Without --run: each product shape in float32, and in bfloat16 with a float32 result, as a chain of
`chain` products in one jitted program (XLA's dot against oneDNN: `dnnl_sgemm` in float32, the
matmul primitive in bfloat16, which runs AMX kernels on an AMX CPU), best of `reps`, in GFLOP/s,
with the largest difference between the two relative to the largest product value.

With --run: runs the script or module with every float32 or bfloat16 linear and tied head of
minilm models on oneDNN (`minilm.layers.matmul_for` replaced in that process: the forward product
and both backward products, summed in float32 and cast to the operands' dtype; transposed operands
read in place), e.g. `--run bench/train_throughput.py --sizes 5m,25m --peer torch` or `--run -m
train default --arms rope --set steps=300 --out DIR`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# (rows, in, out): SmolLM2's prefill products (20 x 256 rows), the lab model's (16 x 128 rows) and
# nanoGPT's 25M (16 x 256 rows).
SHAPES = ((5120, 576, 1536), (5120, 1536, 576), (5120, 576, 576), (2048, 128, 512), (2048, 512, 128),
          (4096, 512, 2048), (4096, 2048, 512), (2048, 2048, 2048))


INSTALL = "pip install onednn-devel-cpu-gomp==2023.2.0"


def libdnnl() -> str:
  path = os.path.join(sys.prefix, "lib", "libdnnl.so.3")
  headers = os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")
  for need in (path, headers):
    if not os.path.exists(need):
      sys.exit(f"onednn: {need} not found; install oneDNN with: {INSTALL}")
  return path


def build(folder: str) -> ctypes.CDLL:
  """Compile bench/onednn_matmul.cc against jaxlib's FFI headers and oneDNN, and load it."""
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    sys.exit("onednn: no C++ compiler (g++, or $CXX) on PATH")
  lib, out = libdnnl(), os.path.join(folder, "onednn_matmul.so")
  command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
             f"-I{os.path.join(sys.prefix, 'include')}",
             os.path.join(HERE, "onednn_matmul.cc"), "-o", out, lib, f"-Wl,-rpath,{os.path.dirname(lib)}"]
  if subprocess.run(command).returncode != 0:
    sys.exit(f"onednn: compiling bench/onednn_matmul.cc failed (its errors above): {' '.join(command)}")
  return ctypes.cdll.LoadLibrary(out)


# the FFI target of each operand dtype
TARGETS = {jnp.dtype(jnp.float32): "onednn_sgemm", jnp.dtype(jnp.bfloat16): "onednn_matmul_bf16"}


_REGISTERED = []


def register() -> None:
  """Build the handlers and register them as FFI targets (once per process)."""
  if _REGISTERED:
    return
  handlers = build(tempfile.mkdtemp(prefix="onednn_"))
  _REGISTERED.append(handlers)
  # in TARGETS' order
  for target, handler in zip(TARGETS.values(), (handlers.OnednnSgemm, handlers.OnednnMatmulBf16)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def gemm(a, b, ta: bool = False, tb: bool = False):
  """op(a) op(b) in float32 by oneDNN (a, b: 2-D, both float32 or both bfloat16)."""
  shape = (a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1])
  return jax.ffi.ffi_call(TARGETS[a.dtype], jax.ShapeDtypeStruct(shape, jnp.float32))(a, b, ta=ta, tb=tb)


@jax.custom_vjp
def linear_product(x, w_CxF):
  """x @ w over x's last axis (both float32 or both bfloat16), every product (forward, dx, dw) by
  oneDNN, summed in float32 and cast to x's dtype."""
  return gemm(x.reshape(-1, x.shape[-1]), w_CxF).reshape(*x.shape[:-1], w_CxF.shape[1]).astype(x.dtype)


def _fwd(x, w):
  return linear_product(x, w), (x, w)


def _bwd(res, dy):
  x, w = res
  x_NxC, dy_NxF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).astype(x.dtype)
  return gemm(dy_NxF, w, tb=True).reshape(x.shape).astype(x.dtype), gemm(x_NxC, dy_NxF, ta=True).astype(w.dtype)


linear_product.defvjp(_fwd, _bwd)


def swap_in() -> None:
  """Every float32 or bfloat16 product through `minilm.layers.matmul_for` (linears, the tied head) on
  oneDNN, in this process; other dtypes keep the model's own path."""
  from minilm import layers, model
  own = layers.matmul_for

  def matmul_for(setting: str, transpose_x: bool = True):
    fallback = own(setting, transpose_x)
    return lambda x, w: (linear_product(x, w) if x.dtype == w.dtype and x.dtype in TARGETS and w.ndim == 2
                         else fallback(x, w))

  layers.matmul_for = model.matmul_for = matmul_for


def _best(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def products(reps: int, chain: int) -> None:
  print(f"{'dtype':>9} {'rows':>5} {'in':>5} {'out':>5}   XLA GFLOP/s  oneDNN GFLOP/s  max diff / max |C|")
  for dtype in (jnp.float32, jnp.bfloat16):
    for rows, d_in, d_out in SHAPES:
      x = jax.random.normal(jax.random.key(0), (rows, d_in)).astype(dtype)
      w = (jax.random.normal(jax.random.key(1), (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)

      def chained(product):
        def f(x, w):   # each product's input depends on the one before, so none is dropped or merged
          a, total = x, 0.0
          for _ in range(chain):
            c = product(a, w)
            total = total + c[0, 0]
            a = x + (jnp.tanh(c[0, 0]) * 1e-30).astype(dtype)
          return total
        return jax.jit(f)

      xla = chained(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
      ours = chained(gemm)
      c_xla, c_ours = (np.asarray(jnp.matmul(x, w, preferred_element_type=jnp.float32)), np.asarray(gemm(x, w)))
      diff = np.abs(c_xla - c_ours).max() / np.abs(c_xla).max()
      gflop = 2 * rows * d_in * d_out * chain / 1e9
      t_xla = _best(lambda: xla(x, w).block_until_ready(), reps)
      t_ours = _best(lambda: ours(x, w).block_until_ready(), reps)
      print(f"{jnp.dtype(dtype).name:>9} {rows:5d} {d_in:5d} {d_out:5d}   {gflop / t_xla:11.0f}  {gflop / t_ours:14.0f}"
            f"  {diff:.1e}")


def main() -> None:
  if "--run" in sys.argv:
    rest = sys.argv[sys.argv.index("--run") + 1:]
    if not rest or (rest[0] == "-m" and len(rest) < 2):
      sys.exit("--run: give a script path or -m MODULE, then its arguments")
    register()
    swap_in()
    if rest[0] == "-m":
      sys.argv = [rest[1]] + rest[2:]
      runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = rest
      sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
      runpy.run_path(rest[0], run_name="__main__")
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=7, help="timings per program; the best counts")
  p.add_argument("--chain", type=int, default=8, help="products per jitted program")
  args = p.parse_args()
  register()
  print(f"jax {jax.__version__}, oneDNN {libdnnl()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
  products(args.reps, args.chain)


if __name__ == "__main__":
  main()
