"""Batches made ahead by worker processes are the batches the training process makes itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import left_running
from minilm.schema import ConfigError
from train import data
from train.cli import main as train_main
from train.prefetch import WorkerBatches, WorkerDied

MIXTURE = {"passkey": 1, "recall": 1, "context_facts": 1, "kb_facts": 1, "text": 1}


def _equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_workers_give_every_stream_its_own_batches_in_any_order():
  """Two seeds drawn step by step (stacked arms), a row slice, a restart from an earlier step and a
  second data config: each call returns train_batch's batch for exactly its arguments."""
  cfg = data.DataConfig(batch_size=4, seq_len=256, mixture=MIXTURE)
  row_cfg = data.DataConfig(batch_size=4, seq_len=256, mixture=MIXTURE, stream="row")
  calls = [(cfg, 0, s, None) for s in range(3)] + [(cfg, 1, 0, None), (cfg, 0, 3, None), (cfg, 1, 1, None)]
  calls += [(row_cfg, 0, s, (1, 3)) for s in (5, 6)] + [(cfg, 0, 1, None), (cfg, 0, 2, None)]
  with WorkerBatches(2, ahead=3) as batch_fn:
    for args in calls:
      _equal(batch_fn(*args), data.train_batch(*args))


def test_only_the_streams_the_loop_draws_stay_in_flight():
  """Arms after one another leave nothing behind; stacked arms keep `ahead` steps each."""
  cfg = data.DataConfig(batch_size=2, seq_len=256)
  with WorkerBatches(1, ahead=2) as batch_fn:
    for seed in range(4):        # arms in turn
      for step in range(5):
        batch_fn(cfg, seed, step)
        assert {key[0][1] for key in batch_fn._pending} == {seed} and len(batch_fn._pending) <= 2
    for step in range(5, 8):     # three stacked arms
      for seed in range(3):
        batch_fn(cfg, seed, step)
    assert len(batch_fn._pending) == 3 * 2


def test_a_worker_error_reaches_the_step_that_raised_it():
  """The ConfigError itself (one line at the command), and the pool goes on serving."""
  cfg = data.DataConfig(batch_size=4, seq_len=256)
  with WorkerBatches(1) as batch_fn:
    with pytest.raises(ConfigError, match=r"^rows: must lie in 0\.\.4; got \(3, 9\)$"):
      batch_fn(cfg, 0, 0, (3, 9))
    _equal(batch_fn(cfg, 0, 1), data.train_batch(cfg, 0, 1))


KILLED_PARENT = """
import os, pathlib, signal, sys
from minilm.schema import ConfigError
from train import data
from train.prefetch import WorkerBatches, WorkerDied
pool = WorkerBatches(2)
pool(data.DataConfig(batch_size=2, seq_len=256), 0, 0)
pathlib.Path(sys.argv[1]).write_text(" ".join(str(pid) for pid in pool._pool._processes))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_leave_when_the_training_process_is_killed(tmp_path):
  pid_file = tmp_path / "pids"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # no pipes: a worker left running would hold them open
  with open(tmp_path / "stderr", "w") as err:
    subprocess.run([sys.executable, "-c", KILLED_PARENT, str(pid_file)], cwd=root, stdout=subprocess.DEVNULL,
                   stderr=err, timeout=120)
  assert pid_file.exists(), (tmp_path / "stderr").read_text()[-2000:]
  pids = [int(p) for p in pid_file.read_text().split()]
  assert len(pids) == 2
  assert not left_running(pids)


def test_a_worker_that_dies_is_one_line():
  """A worker killed (or out of memory) breaks the pool: the next step gets WorkerDied, which
  `python -m train` prints as its one line, not concurrent.futures' traceback."""
  cfg = data.DataConfig(batch_size=2, seq_len=256, mixture=MIXTURE)
  with WorkerBatches(1, ahead=0) as batches:
    batches(cfg, 0, 0)
    (pid,) = batches._pool._processes
    os.kill(pid, signal.SIGKILL)
    assert not left_running([pid])
    with pytest.raises(WorkerDied, match=r"^--data-workers: a worker process ended abruptly \(killed, or out of "
                                         r"memory\); run the same command again: every arm resumes from its last "
                                         r"checkpoint$"):
      for step in range(1, 50):   # the pool notices the death within a few calls
        batches(cfg, 0, step)


@pytest.mark.slow
def test_training_with_data_workers_is_bit_identical(tmp_path):
  """`python -m train --data-workers 2` logs the same rows (every value but the measured rate)."""
  base = ["default", "--no-progress", "--arms", "rope", "--set", "steps=3", "log_every=1", "model.d_model=32",
          "model.n_layers=1", "model.n_heads=2", "model.max_len=48", "data.seq_len=48", "data.batch_size=2",
          'data.mixture={"kb_facts": 1, "text": 1}', "data.facts_per_context=2", "data.questions_per_context=1",
          "eval.n_per_family=0", "checkpoint.every=3"]
  losses = {}
  for workers in (0, 2):
    out = tmp_path / str(workers)
    assert train_main([*base, "--out", str(out), "--data-workers", str(workers)]) == 0
    (metrics,) = out.glob("*/rope/metrics.jsonl")
    losses[workers] = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                       for line in metrics.read_text().splitlines()]
  assert len(losses[0]) == 3 and losses[0] == losses[2]


def test_a_negative_worker_count_is_one_line(capsys):
  assert train_main(["default", "--data-workers", "-1"]) == 2
  assert capsys.readouterr().err.strip() == (f"error: --data-workers: must be 0..{os.cpu_count()} (0: batches made in "
                                             "the training process; at most one per core); got -1")
