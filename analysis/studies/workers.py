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
import pickle
import signal
import sys
import threading
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Iterator, Sequence

from minilm.schema import check

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/{}"


class WorkerError(ChildProcessError):
  """A worker process exited or could not be reached (a task's own error is raised as itself)."""


def cpu_shares(jobs: int, field: str = "jobs") -> list[set[int]]:
  """The CPUs this process may use, split into `jobs` disjoint shares, of whole cores where the cores
  split evenly (a core's hyperthreads in one share); a one-line error naming `field` where jobs is
  not between 1 and the CPU count. One empty share where CPU affinity is unknown (not Linux)."""
  cpus = by_core(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  most = max(len(cpus), 1)
  why = "the CPUs this process may use" if cpus else "more than 1 needs CPU affinity (Linux)"
  check(1 <= jobs <= most, field, f"must be in 1..{most} ({why}); got {jobs}")
  return [set(cpus[k * len(cpus) // jobs:(k + 1) * len(cpus) // jobs]) for k in range(jobs)]


def by_core(cpus) -> list[int]:
  """`cpus` ordered by package and core, so that a core's hyperthreads are adjacent (Linux numbers
  them apart: cpu0 and cpu4 on a 4-core CPU); by number where the topology cannot be read."""
  def read(cpu: int, name: str) -> int:
    with open(_TOPOLOGY.format(cpu, name)) as f:
      return int(f.read())

  def core(cpu: int) -> tuple:
    try:
      return read(cpu, "physical_package_id"), read(cpu, "core_id")
    except (OSError, ValueError):
      return ()
  keys = {cpu: core(cpu) for cpu in cpus}
  whole = all(keys.values())
  return sorted(cpus, key=lambda cpu: (keys[cpu], cpu) if whole else cpu)


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
  it stops the workers. A worker also exits when this process dies."""

  def __init__(self, jobs: int, setup: Callable[..., Any], *args):
    context = multiprocessing.get_context("spawn")   # a forked XLA runtime is not safe
    self.conns, self.procs = [], []
    try:
      for cpus in cpu_shares(jobs):
        parent, child = context.Pipe()
        proc = context.Process(target=_serve, args=(child, cpus), daemon=True)
        proc.start()
        child.close()
        self.conns.append(parent)
        self.procs.append(proc)
      for k in range(jobs):
        self._send(k, (setup, args))
      for k in range(jobs):
        self._receive(k)
    except BaseException:
      self.__exit__(*sys.exc_info())
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
    for conn in self.conns:
      conn.close()

  def run(self, fn: Callable[[Any, Any], Any], tasks: Sequence, family: Callable[[Any], Hashable]) -> Iterator[tuple[int, Any]]:
    """(index, fn(state, task)) for every task, in the order they finish. The first failure is raised
    once the others running have finished: a task's own exception (with the worker's traceback as a
    note), or WorkerError where a worker exited."""
    pending, running, last, failed = list(range(len(tasks))), {}, [None] * len(self.conns), None
    fam = lambda i: family(tasks[i])
    while running or (pending and failed is None):
      for k in range(len(self.conns)):
        if k not in running and pending and failed is None:
          i = pick(pending, fam, last[k], {fam(j) for j in running.values()})
          pending.remove(i)
          try:
            self._send(k, (fn, (tasks[i],)))
          except WorkerError as e:
            failed = WorkerError(f"{e} before task {i}")
            continue
          running[k], last[k] = i, fam(i)
      for conn in wait([self.conns[k] for k in running]):
        k = self.conns.index(conn)
        i = running.pop(k)
        try:
          out = self._receive(k)
        except WorkerError as e:
          failed = failed or WorkerError(f"{e} during task {i}")
          continue
        except Exception as e:   # noqa: BLE001 - the task's own error, raised once the others finish
          failed = failed or e
          continue
        yield i, out
    if failed is not None:
      raise failed

  def _send(self, k: int, message) -> None:
    try:
      self.conns[k].send(message)
    except OSError:   # the worker is gone: its end of the pipe is closed
      raise self._exited(k) from None

  def _receive(self, k: int):
    try:
      status, value = self.conns[k].recv()
    except (EOFError, OSError):   # gone before or while answering
      raise self._exited(k) from None
    if status == "error":
      raise value
    return value

  def _exited(self, k: int) -> WorkerError:
    self.procs[k].join(timeout=10)
    return WorkerError(f"worker {k} exited (code {self.procs[k].exitcode})")


def _serve(conn, cpus: set[int]) -> None:
  """A worker's loop: pin to `cpus` before anything starts a thread pool, then answer the first
  message (setup, args) and each later (fn, (task,)) with ('ok', value) or ('error', exception)."""
  if cpus:
    os.sched_setaffinity(0, cpus)   # XLA:CPU and OpenBLAS size their thread pools from the affinity
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the parent stops us
  parent = multiprocessing.parent_process()   # a killed parent cannot stop us: exit with it
  threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
  import threadpoolctl
  state = unset = object()
  while (message := conn.recv()) is not None:
    fn, args = message
    try:
      with threadpoolctl.threadpool_limits(len(cpus) or None):   # a BLAS loaded before the pinning, too
        if state is unset:
          state, value = fn(*args), None
        else:
          value = fn(state, *args)
      conn.send(("ok", value))
    except Exception as e:   # noqa: BLE001 - every failure goes back to be raised in the parent
      conn.send(("error", _portable(e)))


def _portable(e: Exception) -> Exception:
  """`e` with this worker's traceback as a note, or a RuntimeError of its one line where `e` does not
  survive pickling (an exception class whose arguments are not its message)."""
  note = f"raised in worker process {os.getpid()}:\n{traceback.format_exc().rstrip()}"
  try:
    e.add_note(note)
    pickle.loads(pickle.dumps(e))
    return e
  except Exception:   # noqa: BLE001 - any pickling failure
    plain = RuntimeError(f"{type(e).__name__}: {e}".splitlines()[0])
    plain.add_note(note)
    return plain
