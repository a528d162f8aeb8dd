"""Training and experiment configs: one frozen, validated dataclass per concern.

A TrainConfig is everything one run needs; an ExperimentConfig is a TrainConfig plus named arms,
each a set of dotted overrides (e.g. {'model.position': 'nope'}) applied to the shared config.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from minilm import schema as C
from minilm.config import ModelConfig
from minilm.schema import check, check_choice
from train.data import DataConfig, check_seed
from train.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warm-up then cosine decay to `final_lr`, global-norm clipping."""
  section: typing.ClassVar[str] = "optim"
  lr: float = 5e-3
  final_lr: float = 5e-4
  warmup_steps: int = 30
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0       # 0: no clipping
  accumulate: int = 1          # micro-batches per step (the batch is split, the gradient is exact)

  def __post_init__(self):
    for name in ("lr", "final_lr", "weight_decay", "eps", "clip_norm"):   # inf passes the bounds below
      check(math.isfinite(getattr(self, name)), f"optim.{name}", f"must be a finite number; got {getattr(self, name)}")
    check(self.lr > 0, "optim.lr", f"must be > 0; got {self.lr}")
    check(0 <= self.final_lr <= self.lr, "optim.final_lr", f"must be in [0, lr={self.lr}]; got {self.final_lr}")
    check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0; got {self.warmup_steps}")
    check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
    check(0 <= self.b1 < 1, "optim.b1", f"must be in [0, 1); got {self.b1}")
    check(0 <= self.b2 < 1, "optim.b2", f"must be in [0, 1); got {self.b2}")
    check(self.eps > 0, "optim.eps", f"must be > 0; got {self.eps}")
    check(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 = off); got {self.clip_norm}")
    check(self.accumulate >= 1, "optim.accumulate", f"must be >= 1; got {self.accumulate}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Save at steps 0, 1, 2, 4, ... (log-spaced) below `every`, then every `every` steps and at the end."""
  section: typing.ClassVar[str] = "checkpoint"
  every: int = 100
  log_spaced: bool = True
  keep: int = 0                # 0: keep every checkpoint (emergence analysis reads all of them)

  def __post_init__(self):
    check(self.every >= 1, "checkpoint.every", f"must be >= 1; got {self.every}")
    check(self.keep >= 0, "checkpoint.keep", f"must be >= 0 (0 = keep all); got {self.keep}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out greedy exact-match accuracy every `every` steps and at the end (0: only at the end)."""
  section: typing.ClassVar[str] = "eval"
  every: int = 200
  n_per_family: int = 64
  batch: int = 64              # prompts per greedy call
  seed: int = 1234             # the held-out set is fixed by this seed, not by the training seed

  def __post_init__(self):
    check(self.every >= 0, "eval.every", f"must be >= 0 (0 = only at the end); got {self.every}")
    check(self.n_per_family >= 0, "eval.n_per_family", f"must be >= 0 (0 = no evaluation); got {self.n_per_family}")
    check(self.batch >= 1, "eval.batch", f"must be >= 1; got {self.batch}")
    check_seed(self.seed, "eval.seed")


PARALLEL = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Data parallel (params replicated) or FSDP (params and optimizer state sharded) over devices."""
  section: typing.ClassVar[str] = "parallel"
  strategy: str = "data"
  devices: int = 0             # the first N of jax.devices(), every process's; 0: all

  def __post_init__(self):
    check_choice("parallel.strategy", self.strategy, PARALLEL)
    check(self.devices >= 0, "parallel.devices", f"must be >= 0 (0 = all); got {self.devices}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  section: typing.ClassVar[str] = ""   # fields named as --set names them: steps, model.d_model
  name: str = "run"
  seed: int = 0
  steps: int = 1000
  log_every: int = 10
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

  def __post_init__(self):
    check_seed(self.seed, "seed")
    check(self.steps >= 0, "steps", f"must be >= 0; got {self.steps}")
    check(self.model.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size",
          f"must be >= {ByteTokenizer.vocab_size}, the tokenizer's ids 0..{ByteTokenizer.vocab_size - 1} (train.tokenizer); "
          f"got {self.model.vocab_size}")
    check(self.log_every >= 1, "log_every", f"must be >= 1; got {self.log_every}")
    check(not self.model.position.bounded or self.data.seq_len <= self.model.max_len, "data.seq_len",
          f"must be <= model.max_len={self.model.max_len} for position encoding "
          f"{self.model.position.kind!r}; got {self.data.seq_len}")
    check(self.data.batch_size % self.optim.accumulate == 0, "optim.accumulate",
          f"must divide data.batch_size={self.data.batch_size}; got {self.optim.accumulate}")


FOLDER_RULE = "(not '.' or '..', no '/' or '\\')"


def is_folder_name(name: str) -> bool:
  """A name that is one folder inside the runs (reports) directory, on any OS: FOLDER_RULE."""
  return bool(name) and name not in (".", "..") and not {"/", "\\", "\0"} & set(name)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Arms share `train` (same seed, same batches) and differ only by their dotted overrides."""
  name: str = "experiment"
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  arms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {"main": {}})

  def __post_init__(self):
    check(is_folder_name(self.name), "name", f"must be a folder name {FOLDER_RULE}; got {self.name!r}")
    check(bool(self.arms), "arms", "must name at least one arm")
    for arm in self.arms:
      check(is_folder_name(arm), "arms", f"arm names must be folder names {FOLDER_RULE}; got {arm!r}")

  def resolve(self, arm: str) -> TrainConfig:
    """The TrainConfig of one arm: shared config, its overrides, and name '<experiment>/<arm>'."""
    check_choice("arms", arm, self.arms)
    try:
      return C.override(self.train, {**self.arms[arm], "name": f"{self.name}/{arm}"})
    except C.ConfigError as err:
      raise C.ConfigError(f"arms.{arm}.{err}") from None


def load_experiment(data: dict) -> ExperimentConfig:
  """An ExperimentConfig from a dict; every arm is resolved once so bad arms fail at config time."""
  exp = C.from_dict(ExperimentConfig, data)
  for arm in exp.arms:
    exp.resolve(arm)
  return exp
