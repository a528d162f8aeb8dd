"""Training batches made ahead of the step by worker processes (`python -m train --data-workers N`).

A batch is a pure function of (data config, seed, step, rows) (train.data.train_batch), so any
process can make any step and the loop trains on exactly the batches it would make itself. Without
workers the training process makes each batch while the device runs the step before (asynchronous
dispatch), which keeps an accelerator fed only while one process outpaces it (bench/README.md,
"Data generation"); stacked seeds need a batch per arm each step.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time

from minilm.schema import check
from train import data as D


class WorkerDied(ChildProcessError):
  """A batch worker ended abruptly; str(err) is one line (an OSError without errno: `guarded` prints it)."""


def check_workers(workers: int) -> None:
  cores = os.cpu_count() or 1
  check(0 <= workers <= cores, "--data-workers", f"must be 0..{cores} (0: batches made in the training process; "
        f"at most one per core); got {workers}")


def _worker_init(parent: int) -> None:
  """Leave when the training process is gone (killed, say), which the pool's queues do not tell a
  worker blocked on them; leave Ctrl-C to the training process, which ends the pool."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=watch, daemon=True).start()


class WorkerBatches:
  """A batch_fn for train.loop: `workers` spawned processes keep the next `ahead` steps of each
  stream (data config, seed, rows) in flight; the call for step s returns that step's batch.

  Use as a context manager (the pool ends with it). `batch_fn` must be picklable (a module-level
  function); its errors reach the caller at the step that raised them.
  """

  def __init__(self, workers: int, *, ahead: int | None = None, batch_fn=D.train_batch):
    # spawn: a forked child of a process that has started jax's threads can deadlock
    self._pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                        initializer=_worker_init, initargs=(os.getpid(),))
    self._ahead, self._batch_fn = 2 * workers if ahead is None else ahead, batch_fn
    self._pending: dict[tuple, concurrent.futures.Future] = {}   # (stream, step) -> its batch
    self._served: dict[tuple, int] = {}   # stream -> the last step it was called for

  def __call__(self, cfg: D.DataConfig, seed: int, step: int, rows: tuple[int, int] | None = None) -> dict:
    stream = (repr(cfg), seed, rows)   # a frozen dataclass's repr is its value
    self._served[stream] = step
    # Dropped: streams the loop no longer draws (an arm that ended), and this stream's steps before a
    # jump. Stacked arms are each called once a step: a live stream was last called for this step or
    # the one before.
    done = {other for other, last in self._served.items() if last not in (step - 1, step)}
    for key in [k for k in self._pending if k[0] in done or k[0] == stream and k[1] < step]:
      self._pending.pop(key).cancel()
    for other in done:
      del self._served[other]
    try:
      for s in range(step, step + self._ahead + 1):
        if (stream, s) not in self._pending:
          self._pending[stream, s] = self._pool.submit(self._batch_fn, cfg, seed, s, rows)
      return self._pending.pop((stream, step)).result()
    except concurrent.futures.BrokenExecutor:   # a worker died: the pool is unusable
      raise WorkerDied("--data-workers: a worker process ended abruptly (killed, or out of memory); run the "
                       "same command again: every arm resumes from its last checkpoint") from None

  def close(self) -> None:
    self._pending.clear()
    self._served.clear()
    self._pool.shutdown(cancel_futures=True)

  def __enter__(self) -> WorkerBatches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
