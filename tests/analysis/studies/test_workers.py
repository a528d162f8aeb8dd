"""The worker pool (analysis.studies.workers): CPU shares, the family rule, pinned workers, failures."""
from __future__ import annotations

import os

import pytest

from analysis.studies import workers
from helpers import worker_setup, worker_task
from minilm.schema import ConfigError

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="two workers need two CPUs this process may use")


def test_cpu_shares_split_the_cpus_and_name_the_field():
  assert workers.cpu_shares(1) == [set(CPUS)]
  with pytest.raises(ConfigError, match=r"^--jobs: must be >= 1; got 0$"):
    workers.cpu_shares(0, "--jobs")
  with pytest.raises(ConfigError, match=rf"^--jobs: must be at most the {len(CPUS)} CPUs"):
    workers.cpu_shares(len(CPUS) + 1, "--jobs")
  if len(CPUS) >= 2:
    shares = workers.cpu_shares(2)
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(CPUS)


def test_a_worker_keeps_its_family_then_takes_the_largest_free_one():
  family = dict(enumerate("aabbbcc")).get
  assert workers.pick([0, 1, 2, 3, 4, 5, 6], family, None, set()) == 2         # b: most pending
  assert workers.pick([0, 1, 3, 4, 5, 6], family, None, {"b"}) == 0            # a and c tie: a comes first
  assert workers.pick([1, 3, 4, 5, 6], family, "c", {"b"}) == 5                # its own family first
  assert workers.pick([0, 1, 5], family, "b", {"a"}) == 5                      # b is done: c, which is free
  assert workers.pick([0, 1], family, "c", {"a"}) == 0                         # only a is left: shares it


@two_cpus
def test_workers_run_every_task_pinned_to_disjoint_cpus():
  with workers.Pool(2, worker_setup, 100) as pool:
    out = dict(pool.run(worker_task, list(range(6)), family=lambda t: t % 2))
  assert sorted(out) == list(range(6)) and [out[i][0] for i in range(6)] == [100 + i for i in range(6)]
  shares = {tuple(cpus) for _, cpus, _ in out.values()}
  assert shares == {tuple(sorted(s)) for s in workers.cpu_shares(2)}
  blas = {n for _, cpus, threads in out.values() for n in threads}
  assert blas <= {len(CPUS) // 2, -(-len(CPUS) // 2)}   # BLAS threads: the worker's share, not the machine


@two_cpus
def test_a_failed_task_is_one_line_after_the_others_finish():
  finished = []
  with workers.Pool(2, worker_setup, 0) as pool:
    with pytest.raises(workers.WorkerError, match=r"^ValueError: task -1 is negative$"):
      for i, out in pool.run(worker_task, [1, -1, 2, 3], family=lambda t: 0):
        finished.append(i)
  assert 0 in finished and 1 not in finished   # the task running beside the failure still came back
  with pytest.raises(workers.WorkerError, match=r"^ValueError: task -5 is negative$"):
    workers.Pool(2, worker_task, {"base": 0}, -5)   # a failed setup stops the workers
