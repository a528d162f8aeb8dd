"""Independent tasks in worker processes, each pinned to its own share of the CPUs.

One XLA:CPU process leaves cores idle: it compiles on one core, and its small ops and Python steps
do not fill the others. Processes pinned to disjoint CPU shares fill them. Each worker's XLA and BLAS
use only its share, so on a 2-core CPU two single-core workers run two tasks side by side.

A task goes preferably to a worker that has run a task of its `family` (tasks that run the same
compiled programs), so that two workers seldom compile the same programs.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Iterator, Sequence

from minilm.schema import check


class WorkerError(RuntimeError):
  """A task failed in a worker: the message is its error's one line."""


def cpu_shares(jobs: int, field: str = "jobs") -> list[set[int]]:
  """The CPUs this process may use, dealt round-robin into `jobs` disjoint shares; a one-line error
  naming `field` where there are fewer CPUs than jobs or no CPU affinity (Linux only)."""
  check(jobs >= 1, field, f"must be >= 1; got {jobs}")
  affinity = hasattr(os, "sched_setaffinity")
  check(jobs == 1 or affinity, field, f"more than 1 needs CPU affinity (Linux); got {jobs}")
  cpus = sorted(os.sched_getaffinity(0)) if affinity else list(range(os.cpu_count() or 1))
  check(jobs <= len(cpus), field, f"must be at most the {len(cpus)} CPUs this process may use; got {jobs}")
  return [set(cpus[k::jobs]) for k in range(jobs)]


def pick(pending: Sequence[int], family: Callable[[int], Hashable], mine: Hashable, others: set) -> int:
  """The next task for a worker: the first pending one of the family it ran last (`mine`), else the
  first of the family with the most pending tasks that no other worker runs (`others`), else of the
  family with the most pending tasks."""
  for i in pending:
    if family(i) == mine:
      return i
  count = collections.Counter(family(i) for i in pending)
  free = [f for f in count if f not in others]
  best = max(free or count, key=lambda f: count[f])   # max keeps the first of equals: first appearance
  return next(i for i in pending if family(i) == best)


class Pool:
  """`jobs` spawned worker processes, each pinned to one of `cpu_shares(jobs)`, each holding the state
  that setup(*args) returns (args are pickled once per worker). Use it as a context manager: leaving
  it stops the workers."""

  def __init__(self, jobs: int, setup: Callable[..., Any], *args):
    context = multiprocessing.get_context("spawn")   # a forked XLA runtime is not safe
    self.conns, self.procs = [], []
    for cpus in cpu_shares(jobs):
      parent, child = context.Pipe()
      proc = context.Process(target=_serve, args=(child, cpus), daemon=True)
      proc.start()
      child.close()
      self.conns.append(parent)
      self.procs.append(proc)
    try:
      for conn in self.conns:
        conn.send((setup, args))
      for k in range(jobs):
        self._receive(k)
    except BaseException:
      self.__exit__()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    """Idle workers are asked to stop; after an error or an interrupt, busy ones are terminated."""
    for conn in self.conns:
      try:
        conn.send(None)
      except OSError:
        pass
    for proc in self.procs:
      proc.join(timeout=10 if not exc or exc[0] is None else 0)
      if proc.is_alive():
        proc.terminate()
        proc.join()

  def run(self, fn: Callable[[Any, Any], Any], tasks: Sequence, family: Callable[[Any], Hashable]) -> Iterator[tuple[int, Any]]:
    """(index, fn(state, task)) for every task, in the order they finish; the first failure raises
    WorkerError once the others running have finished."""
    pending, running, last, failed = list(range(len(tasks))), {}, [None] * len(self.conns), None
    fam = lambda i: family(tasks[i])
    while running or (pending and failed is None):
      for k in range(len(self.conns)):
        if k not in running and pending and failed is None:
          i = pick(pending, fam, last[k], {fam(j) for j in running.values()})
          pending.remove(i)
          running[k], last[k] = i, fam(i)
          self.conns[k].send((fn, (tasks[i],)))
      for conn in wait([self.conns[k] for k in running]):
        k = self.conns.index(conn)
        i = running.pop(k)
        try:
          out = self._receive(k)
        except WorkerError as e:
          failed = failed or e
          continue
        yield i, out
    if failed is not None:
      raise failed

  def _receive(self, k: int):
    try:
      status, value = self.conns[k].recv()
    except EOFError:
      self.procs[k].join(timeout=10)
      raise WorkerError(f"worker {k} exited (code {self.procs[k].exitcode})") from None
    if status == "error":
      raise WorkerError(value)
    return value


def _serve(conn, cpus: set[int]) -> None:
  """A worker's loop: pin to `cpus` before anything starts a thread pool, then answer the first
  message (setup, args) and each later (fn, (task,)) with ('ok', value) or ('error', one line)."""
  os.sched_setaffinity(0, cpus)   # XLA:CPU and OpenBLAS size their thread pools from the affinity
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the parent stops us
  import threadpoolctl
  state = unset = object()
  while (message := conn.recv()) is not None:
    fn, args = message
    try:
      with threadpoolctl.threadpool_limits(len(cpus)):   # a BLAS loaded before the pinning, too
        if state is unset:
          state, value = fn(*args), None
        else:
          value = fn(state, *args)
      conn.send(("ok", value))
    except Exception as e:   # noqa: BLE001 - every failure goes back as one line
      conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
