"""minilm.machine: the CPU a run records, read from /proc/cpuinfo's text, and the matmul rate."""
from __future__ import annotations

import pytest

from minilm import machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16 avx512_bf16

processor\t: 1
model name\t: another model
flags\t\t: fpu
"""


def test_the_first_processor_gives_the_model_and_flags():
  model, flags = machine.parse_cpuinfo(CPUINFO)
  assert model == "Intel(R) Xeon(R) Processor"
  assert flags == {"fpu", "sse2", "avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}


@pytest.mark.parametrize("flags, listed", [
    ("fpu sse2 avx2 avx512f amx_tile amx_bf16 avx512_bf16", "avx2, avx512f, avx512_bf16, amx_bf16"),   # KERNEL_FLAGS' order
    ("fpu sse2 avx2", "avx2"),
    ("fpu sse2", "none of avx2, avx512f, avx512_bf16, amx_bf16"),
])
def test_describe_cpu_names_the_model_and_the_kernel_flags_it_has(monkeypatch, flags, listed):
  monkeypatch.setattr(machine, "cpu_info", lambda: machine.parse_cpuinfo(f"model name : M\nflags : {flags}\n"))
  assert machine.describe_cpu() == f"M; {listed}"


def test_an_unreadable_cpuinfo_is_an_unknown_cpu(monkeypatch):
  monkeypatch.setattr(machine, "cpu_info", lambda: ("", frozenset()))
  assert machine.describe_cpu() == "unknown CPU" and machine.cpu_flags() == frozenset()
  assert machine.parse_cpuinfo("") == ("", frozenset())


def test_matmul_rate_is_flops_over_the_best_time(monkeypatch):
  ticks = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])   # three timed products: 2 s, 1 s, 4 s
  monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
  assert machine.matmul_rate(n=8, reps=3) == 2 * 8 ** 3 / 1.0
