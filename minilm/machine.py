"""What the machine is: its CPU (model, and the vector and matrix extensions that XLA:CPU's kernels
depend on) and its measured float32 matmul rate. CPUs of one kind differ in both: AVX2, AVX-512 and
AMX Xeons sum some products in another order (float results move within tolerance) and run the same
lab at different speeds, so a run records which it had."""
from __future__ import annotations

import functools
import time

# The extensions that change which kernels XLA:CPU runs (bench/README.md: AVX2 EPYC, AVX-512 EPYC,
# AMX Xeon), in the order a record lists them.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
  """(CPU model name, feature flags) from Linux's /proc/cpuinfo; ('', empty) where it cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      return parse_cpuinfo(f.read())
  except OSError:
    return "", frozenset()


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
  """(model name, flags) of the first processor listed in /proc/cpuinfo's text."""
  fields = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields.get("model name", ""), frozenset(fields.get("flags", "").split())


def cpu_flags() -> frozenset[str]:
  """This machine's CPU feature flags; empty where they cannot be read."""
  return cpu_info()[1]


def describe_cpu() -> str:
  """'Intel(R) Xeon(R) Processor; avx2, avx512f, avx512_bf16, amx_bf16': the model and which of
  KERNEL_FLAGS it has ('unknown CPU' where /proc/cpuinfo cannot be read)."""
  model, flags = cpu_info()
  if not model and not flags:
    return "unknown CPU"
  have = [f for f in KERNEL_FLAGS if f in flags]
  return f"{model or 'unknown model'}; {', '.join(have) if have else 'none of ' + ', '.join(KERNEL_FLAGS)}"


def best_seconds(fn, reps: int = 1) -> float:
  """The shortest wall time of `reps` calls of fn()."""
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_rate(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n^3 matmul on jax's default device, best of `reps`, as minilm's linears compute it:
  inputs in `dtype`, sums in float32."""
  import jax   # here: reading the CPU needs no jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(x))
  return 2 * n ** 3 / best_seconds(lambda: jax.block_until_ready(matmul(x)), reps)
