"""The worker pool (analysis.studies.workers): CPU shares, the family rule, pinned workers, failures."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from analysis.studies import workers
from helpers import left_running, worker_setup, worker_task
from minilm.schema import ConfigError

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="two workers need two CPUs this process may use")


def test_cpu_shares_split_the_cpus_and_name_the_field():
  assert workers.cpu_shares(1) == [set(CPUS)]
  most = max(len(CPUS), 1)
  with pytest.raises(ConfigError, match=rf"^--jobs: must be in 1..{most} \(.*\); got 0$"):
    workers.cpu_shares(0, "--jobs")
  with pytest.raises(ConfigError, match=rf"^--jobs: must be in 1..{most} \(.*\); got {most + 1}$"):
    workers.cpu_shares(most + 1, "--jobs")
  if len(CPUS) >= 2:
    shares = workers.cpu_shares(2)
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(CPUS)


def test_hyperthreads_of_a_core_share_a_worker(monkeypatch):
  """Linux numbers a core's hyperthreads apart (cpu0 and cpu2 on 2 cores x 2 threads): a share of
  whole cores keeps them together; with more jobs than cores they split."""
  core = {0: 0, 1: 1, 2: 0, 3: 1}
  def fake_open(path):
    cpu, name = int(path.split("/cpu")[-1].split("/")[0]), path.rsplit("/", 1)[1]
    return __import__("io").StringIO("0\n" if name == "physical_package_id" else f"{core[cpu]}\n")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
  monkeypatch.setattr(workers, "open", fake_open, raising=False)
  assert workers.cpu_shares(2) == [{0, 2}, {1, 3}]
  assert workers.cpu_shares(4) == [{0}, {2}, {1}, {3}]
  monkeypatch.setattr(workers, "open", lambda path: (_ for _ in ()).throw(OSError(path)), raising=False)
  assert workers.cpu_shares(2) == [{0, 1}, {2, 3}]   # no topology: by number


def test_a_worker_keeps_its_family_then_takes_the_largest_free_one():
  family = dict(enumerate("aabbbcc")).get
  assert workers.pick([0, 1, 2, 3, 4, 5, 6], family, None, set()) == 2         # b: most pending
  assert workers.pick([0, 1, 3, 4, 5, 6], family, None, {"b"}) == 0            # a and c tie: a comes first
  assert workers.pick([1, 3, 4, 5, 6], family, "c", {"b"}) == 5                # its own family first
  assert workers.pick([0, 1, 5], family, "b", {"a"}) == 5                      # b is done: c, which is free
  assert workers.pick([0, 1], family, "c", {"a"}) == 0                         # only a is left: shares it


@pytest.mark.slow   # spawns worker processes
@two_cpus
def test_workers_run_every_task_pinned_to_disjoint_cpus():
  with workers.Pool(2, worker_setup, 100) as pool:
    out = dict(pool.run(worker_task, list(range(6)), family=lambda t: t % 2))
  assert not any(p.is_alive() for p in pool.procs)
  assert sorted(out) == list(range(6)) and [out[i][0] for i in range(6)] == [100 + i for i in range(6)]
  shares = {tuple(cpus) for _, cpus, _ in out.values()}
  assert shares == {tuple(sorted(s)) for s in workers.cpu_shares(2)}
  blas = {n for _, cpus, threads in out.values() for n in threads}
  assert blas and blas <= {len(CPUS) // 2, -(-len(CPUS) // 2)}   # BLAS threads: the worker's share, not the machine


@pytest.mark.slow   # spawns worker processes
@two_cpus
def test_a_failed_task_raises_its_own_error_after_the_others_finish():
  finished = []
  with workers.Pool(2, worker_setup, 0) as pool:
    with pytest.raises(ValueError, match=r"^task -1 is negative\nsecond line\nraised in worker process") as failure:
      for i, out in pool.run(worker_task, [50, -1, 2, 3], family=lambda t: 0):
        finished.append(i)
  assert finished == [0]   # the half-second task beside the failure came back; none started after it
  assert "in worker_task" in failure.value.__notes__[0]   # the worker's traceback
  assert not any(p.is_alive() for p in pool.procs)
  with pytest.raises(ValueError, match=r"^task -5 is negative"):
    workers.Pool(2, worker_task, {"base": 0}, -5)   # a failed setup stops the workers


@pytest.mark.slow   # spawns worker processes
@two_cpus
def test_a_worker_that_exits_is_one_line_and_the_loop_can_stop_early():
  with workers.Pool(2, worker_setup, 0) as pool:
    with pytest.raises(workers.WorkerError, match=r"^worker \d exited \(code 3\) during task 1$"):
      list(pool.run(worker_task, [20, "exit", 2], family=lambda t: 0))
    with pytest.raises(workers.WorkerError, match=r"^worker \d exited \(code 3\) (before|during) task \d$"):
      list(pool.run(worker_task, [1, 2, 3], family=lambda t: 0))   # the exited worker cannot take a task
  start = time.monotonic()
  with pytest.raises(KeyError):
    with workers.Pool(2, worker_setup, 0) as pool:
      for _ in pool.run(worker_task, [0, 3000], family=lambda t: 0):
        raise KeyError("the caller's own error")
  assert time.monotonic() - start < 20 and not any(p.is_alive() for p in pool.procs)   # the 30 s task was stopped


@pytest.mark.slow   # spawns worker processes
@two_cpus
def test_workers_exit_when_their_parent_is_killed():
  script = ("import os, sys; sys.path[:0] = sys.argv[1:]\n"
            "from analysis.studies import workers; from helpers import worker_setup, worker_task\n"
            "pool = workers.Pool(2, worker_setup, 0)\n"
            "print(*[p.pid for p in pool.procs], flush=True)\n"
            "list(pool.run(worker_task, [6000, 6000], family=lambda t: t))\n")
  here = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  parent = subprocess.Popen([sys.executable, "-c", script, here, os.path.dirname(here)], stdout=subprocess.PIPE, text=True)
  pids = [int(p) for p in parent.stdout.readline().split()]
  time.sleep(1)
  parent.kill()
  parent.wait()
  assert len(pids) == 2 and not left_running(pids)
