"""XLA:CPU's matmul against PyTorch's CPU products called from inside jit (a jax.ffi custom call).

    .venv/bin/python bench/torch_matmul.py [--reps 7] [--chain 8]
    .venv/bin/python bench/torch_matmul.py [--dtypes float32,bfloat16] --run SCRIPT.py|-m MODULE [ARGS ...]

An experiment, not a path of the model: minilm's matmul stays XLA's (bench/README, "PyTorch's products
through jax.ffi"). Needs a C++ compiler and the bench extra (`pip install -e '.[bench]'`: CPU torch,
whose wheel carries ATen's headers and, inside libtorch_cpu, MKL and oneDNN); the handlers
(bench/torch_matmul.cc: ATen's mm into XLA's result buffer, a transposed operand read in place) are
compiled into a temporary folder at start (about 15 s).

Without --run: each product shape in float32, and in bfloat16 (XLA's dot summed in float32 and rounded
to bfloat16, as minilm's matmul does), as a chain of `chain` products in one jitted program, XLA's
against PyTorch's (MKL's sgemm in float32; oneDNN's matmul in bfloat16, AMX kernels on an AMX CPU),
best of `reps`, in GFLOP/s, with the largest difference between the two relative to the largest
product value.

With --run: runs the script or module with every linear and tied head of minilm models in the
`--dtypes` on PyTorch's products (`minilm.layers.matmul_for` replaced in that process: the forward
product and both backward products, transposed operands read in place), e.g. `--dtypes bfloat16 --run
bench/train_throughput.py --sizes 5m,25m --dtype bfloat16 --peer torch` or `--run -m train default
--arms rope --set steps=300 --out DIR`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
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
# nanoGPT's 1M, 5M and 25M (16 x 256 rows).
SHAPES = ((5120, 576, 1536), (5120, 1536, 576), (2048, 128, 512), (2048, 512, 128), (4096, 128, 512),
          (4096, 512, 128), (4096, 256, 1024), (4096, 1024, 256), (4096, 512, 2048), (4096, 2048, 512),
          (2048, 2048, 2048))
# the FFI target of each operand dtype (the result has the operands' dtype)
TARGETS = {"float32": "torch_mm_f32", "bfloat16": "torch_mm_bf16"}


def build(folder: str) -> ctypes.CDLL:
  """Compile bench/torch_matmul.cc against jaxlib's FFI headers and libtorch_cpu, and load it."""
  try:
    import torch   # loads libtorch_cpu and its OpenMP before the handlers need them
  except ImportError:
    sys.exit("torch_matmul: needs torch; install the bench extra: pip install -e '.[bench]'")
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    sys.exit("torch_matmul: no C++ compiler (g++, or $CXX) on PATH")
  home, out = os.path.dirname(torch.__file__), os.path.join(folder, "torch_matmul.so")
  lib = os.path.join(home, "lib")
  command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{jax.ffi.include_dir()}", f"-I{os.path.join(home, 'include')}",
             os.path.join(HERE, "torch_matmul.cc"), "-o", out, f"-L{lib}", "-ltorch_cpu", "-lc10",
             f"-Wl,-rpath,{lib}"]
  if subprocess.run(command).returncode != 0:
    sys.exit(f"torch_matmul: compiling bench/torch_matmul.cc failed (its errors above): {' '.join(command)}")
  return ctypes.cdll.LoadLibrary(out)


_REGISTERED = []


def register() -> None:
  """Build the handlers and register them as FFI targets (once per process)."""
  if _REGISTERED:
    return
  handlers = build(tempfile.mkdtemp(prefix="torch_matmul_"))
  _REGISTERED.append(handlers)
  for target, handler in zip(TARGETS.values(), (handlers.TorchMmF32, handlers.TorchMmBf16)):   # TARGETS' order
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def gemm(a, b, ta: bool = False, tb: bool = False):
  """op(a) op(b) by PyTorch (a, b: 2-D, both float32 or both bfloat16), in their dtype."""
  shape = (a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1])
  return jax.ffi.ffi_call(TARGETS[jnp.dtype(a.dtype).name], jax.ShapeDtypeStruct(shape, a.dtype))(a, b, ta=ta, tb=tb)


@jax.custom_vjp
def linear_product(x, w_CxF):
  """x @ w over x's last axis (both float32 or both bfloat16), every product (forward, dx, dw) by
  PyTorch."""
  return gemm(x.reshape(-1, x.shape[-1]), w_CxF).reshape(*x.shape[:-1], w_CxF.shape[1])


def _fwd(x, w):
  return linear_product(x, w), (x, w)


def _bwd(res, dy):
  x, w = res
  x_NxC, dy_NxF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).astype(x.dtype)
  return gemm(dy_NxF, w, tb=True).reshape(x.shape), gemm(x_NxC, dy_NxF, ta=True).astype(w.dtype)


linear_product.defvjp(_fwd, _bwd)


def swap_in(dtypes=tuple(TARGETS)) -> None:
  """Every product in `dtypes` through `minilm.layers.matmul_for` (linears, the tied head) on PyTorch,
  in this process; other dtypes keep the model's own path."""
  from minilm import layers, model
  own = layers.matmul_for

  def matmul_for(setting: str, transpose_x: bool = True):
    fallback = own(setting, transpose_x)
    return lambda x, w: (linear_product(x, w) if x.dtype == w.dtype and jnp.dtype(x.dtype).name in dtypes
                         and w.ndim == 2 else fallback(x, w))

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
  print(f"{'dtype':>9} {'rows':>5} {'in':>5} {'out':>5}   XLA GFLOP/s  torch GFLOP/s  max diff / max |C|")
  for dtype in (jnp.float32, jnp.bfloat16):
    for rows, d_in, d_out in SHAPES:
      x = jax.random.normal(jax.random.key(0), (rows, d_in)).astype(dtype)
      w = (jax.random.normal(jax.random.key(1), (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)

      def chained(product):
        def f(x, w):   # each product's input depends on the one before, so none is dropped or merged
          a, total = x, 0.0
          for _ in range(chain):
            c = product(a, w).astype(jnp.float32)
            total = total + c[0, 0]
            a = x + (jnp.tanh(c[0, 0]) * 1e-30).astype(dtype)
          return total
        return jax.jit(f)

      xla_product = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)
      c_xla, c_ours = (np.asarray(xla_product(x, w), np.float32), np.asarray(gemm(x, w), np.float32))
      diff = np.abs(c_xla - c_ours).max() / np.abs(c_xla).max()
      gflop = 2 * rows * d_in * d_out * chain / 1e9
      xla, ours = chained(xla_product), chained(gemm)
      t_xla = _best(lambda: xla(x, w).block_until_ready(), reps)
      t_ours = _best(lambda: ours(x, w).block_until_ready(), reps)
      print(f"{jnp.dtype(dtype).name:>9} {rows:5d} {d_in:5d} {d_out:5d}   {gflop / t_xla:11.0f}  {gflop / t_ours:13.0f}"
            f"  {diff:.1e}", flush=True)


def main() -> None:
  run = sys.argv.index("--run") if "--run" in sys.argv else len(sys.argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=7, help="timings per program; the best counts")
  p.add_argument("--chain", type=int, default=8, help="products per jitted program")
  p.add_argument("--dtypes", default="float32,bfloat16", help="with --run: the products' dtypes put on PyTorch")
  args = p.parse_args(sys.argv[1:run])
  dtypes = tuple(args.dtypes.split(","))
  if not set(dtypes) <= set(TARGETS):
    p.error(f"--dtypes: {args.dtypes!r}; allowed: a comma-separated subset of {', '.join(TARGETS)}")
  register()
  if run < len(sys.argv):
    rest = sys.argv[run + 1:]
    if not rest or (rest[0] == "-m" and len(rest) < 2):
      sys.exit("--run: give a script path or -m MODULE, then its arguments")
    swap_in(dtypes)
    if rest[0] == "-m":
      sys.argv = [rest[1]] + rest[2:]
      runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = rest
      sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
      runpy.run_path(rest[0], run_name="__main__")
    return
  import torch
  onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
  print(f"jax {jax.__version__}, torch {torch.__version__} (oneDNN {onednn.group(1) if onednn else 'unknown'}, "
        f"threads {torch.get_num_threads()})")
  products(args.reps, args.chain)


if __name__ == "__main__":
  main()
