"""Training: loss, accumulation, schedules, paired initialisation, evaluation, bit-exact resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minilm import schema as C
from minilm.generate import greedy
from train import cli, data as D, evaluate, loop, schedule, sharding, step as S
from train.checkpoints import abstract_model
from train.config import ExperimentConfig, TrainConfig

SMOKE = cli.load("smoke", [])
EPS32 = float(np.finfo(np.float32).eps)


def smoke(**overrides) -> TrainConfig:
  """The tiny smoke config (configs/smoke.json), rope arm, with dotted overrides."""
  return C.override(SMOKE.resolve("rope"), overrides)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_weighted_loss_is_normalised_by_the_weight_sum():
  cfg = smoke()
  graphdef, _, rest = abstract_model(cfg.model)
  params = loop.init_params(cfg.model, 0)
  batch = D.train_batch(cfg.data, 0, 0)
  logits = np.asarray(nnx.merge(graphdef, params, rest)(batch["inputs"]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  expected = (ce * batch["weights"]).sum() / batch["weights"].sum()
  assert 0 < batch["weights"].sum() < batch["weights"].size  # padding and other tokens really weigh less
  got = float(jax.jit(S.weighted_loss, static_argnums=1)(params, graphdef, rest, batch))
  # A float32 weighted mean of n = B*T terms of one sign: the recursive-summation bound is (n-1)*eps/2
  # relative, so n*eps covers it and the float32 log-softmax of each term.
  assert got == pytest.approx(expected, rel=batch["weights"].size * EPS32)


def test_gradient_accumulation_matches_the_full_batch():
  # warmup 0: the first update has lr > 0 (else the params could not differ); Adam eps=1: the step is
  # ~lr*g, linear in the gradient, instead of ~lr*sign(g), which turns the rounding of a gradient
  # element near 1e-8 into a difference of up to lr.
  cfg = smoke(**{"optim.warmup_steps": 0, "optim.eps": 1.0})
  graphdef, _, rest = abstract_model(cfg.model)
  batch = D.train_batch(cfg.data, 0, 3)
  mesh = sharding.make_mesh(1)
  initial = leaves(loop.init_params(cfg.model, 0))
  out = {}
  for accumulate in (1, 2):
    optim = C.override(cfg.optim, {"accumulate": accumulate})
    params = loop.init_params(cfg.model, 0)
    opt_state = S.init_opt_state(params, cfg=optim, steps=cfg.steps, mesh=mesh, strategy="data")
    params, _, metrics = S.train_step(params, opt_state, rest, batch, 3, graphdef=graphdef, cfg=optim,
                                      steps=cfg.steps, mesh=mesh, strategy="data")
    out[accumulate] = (leaves(params), float(metrics["loss"]), float(metrics["grad_norm"]))
  # Loss and gradient are sums over the same n = B*T tokens in another order (per micro-batch, then
  # across): relative error about (n-1)*eps/2 for terms of one sign, so n*eps bounds both.
  n = batch["weights"].size
  assert out[1][1] == pytest.approx(out[2][1], rel=n * EPS32)
  assert out[1][2] == pytest.approx(out[2][2], rel=n * EPS32)
  # A param moves by its step (at most max_step); the steps differ by n*eps of it, and p - step is
  # rounded once more (one spacing of the largest |p|).
  max_step = max(np.abs(a - p).max() for a, p in zip(out[1][0], initial))
  atol = n * EPS32 * max_step + np.spacing(max(np.abs(p).max() for p in initial))
  assert max_step > 100 * atol   # the update is real, far above the tolerance
  for a, b in zip(out[1][0], out[2][0]):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_lr_schedule_warms_up_then_decays_to_final():
  optim = C.override(smoke().optim, {"lr": 1e-2, "final_lr": 1e-3, "warmup_steps": 10})
  lr = S.lr_schedule(optim, 100)
  ulps = 8 * EPS32   # a handful of float32 operations (cosine, scale, shift), each rounded once
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1e-2, rel=ulps)
  assert float(lr(55)) < 1e-2
  assert float(lr(100)) == pytest.approx(1e-3, rel=ulps)


def test_save_schedule_is_log_spaced_then_regular():
  assert schedule.save_steps(1000, 100) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 400, 500, 600,
                                            700, 800, 900, 1000]
  assert schedule.save_steps(25, 10, log_spaced=False) == [0, 10, 20, 25]
  assert [s for s in range(1, 13) if schedule.is_eval_step(s, 12, 5)] == [5, 10, 12]
  assert [s for s in range(1, 13) if schedule.is_eval_step(s, 12, 0)] == [12]


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


def test_bounded_positions_refuse_seq_len_beyond_max_len():
  with pytest.raises(C.ConfigError, match=r"^data.seq_len: must be <= model.max_len=64 .*'learned'"):
    smoke(**{"model.position": "learned", "model.max_len": 64})
  with pytest.raises(C.ConfigError, match=r"^data.seq_len: .*'sinusoidal'"):
    smoke(**{"model.position": "sinusoidal", "model.max_len": 64})
  assert smoke(**{"model.max_len": 64}).model.max_len == 64  # RoPE has no table: a soft limit


def _examples_from_own_greedy(model, n=6, prompt_len=9, answer_len=2):
  """Examples whose answers are (even rows) or are not (odd rows) what the model itself generates."""
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, 256, (n, prompt_len)).astype(np.int32)
  own = np.asarray(greedy(model, prompts, answer_len))
  examples = []
  for i in range(n):
    wrong = own[i].copy()
    wrong[-1] = (wrong[-1] + 1) % 256
    answer = own[i] if i % 2 == 0 else wrong
    examples.append(D.Example("recall" if i < n // 2 else "conflict", prompts[i], answer, "",
                              {} if i < n // 2 else {"context_answer": answer, "memory_answer": own[i]}))
  # a second prompt length, so greedy needs a second group
  short = rng.integers(0, 256, (2, prompt_len - 3)).astype(np.int32)
  own_short = np.asarray(greedy(model, short, answer_len))
  examples += [D.Example("passkey", short[i], own_short[i], "", {}) for i in range(2)]
  return examples


def test_accuracy_forced_equals_greedy_and_scores_conflicts():
  cfg = smoke(**{"model.init_std": 0.5})   # wide logit margins: no near-ties for rounding to flip
  graphdef, _, rest = abstract_model(cfg.model)
  model = nnx.merge(graphdef, loop.init_params(cfg.model, 0), rest)
  examples = _examples_from_own_greedy(model)
  greedy_scores = evaluate.accuracy(model, examples, method="greedy", batch=4)
  forced_scores = evaluate.accuracy(model, examples, method="forced", batch=4)
  assert greedy_scores == forced_scores
  # recall rows 0,1,2 -> right, wrong, right; conflict rows 3,4,5 -> wrong, right, wrong (vs answer)
  assert forced_scores["recall"] == pytest.approx(2 / 3)
  assert forced_scores["conflict"] == pytest.approx(1 / 3)
  assert forced_scores["passkey"] == 1.0
  # conflict rows: 4 follows the context answer; 3 and 5 generate the 'memory' answer
  assert forced_scores["conflict.follows_context"] == pytest.approx(1 / 3)
  assert forced_scores["conflict.follows_memory"] == pytest.approx(2 / 3)
  assert forced_scores["conflict.other"] == 0.0
  with pytest.raises(ValueError, match="^method: 'forced' takes no greedy arguments"):
    evaluate.accuracy(model, examples, method="forced", hook=lambda a, n, x: x)


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  cfg = smoke(log_every=1)
  full = loop.train(cfg, str(tmp_path / "full"), progress=False)
  loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_at=5)   # "killed" after step 5; last save: 4
  rows = [json.loads(l) for l in open(tmp_path / "cut" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  resumed = loop.train(cfg, str(tmp_path / "cut"), progress=False)
  assert resumed["metrics"]["loss"] == full["metrics"]["loss"]

  def table(name, path):
    return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(tmp_path / path / name)]

  for name in ("metrics.jsonl", "eval.jsonl"):
    assert table(name, "full") == table(name, "cut"), name   # step 5 was dropped and redone, not doubled
  from train.checkpoints import load_model
  a, _ = load_model(str(tmp_path / "full"))
  b, _ = load_model(str(tmp_path / "cut"))
  for x, y in zip(leaves(nnx.state(a)), leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(leaves(nnx.state(a))[0], leaves(loop.init_params(cfg.model, cfg.seed))[0])


def test_a_non_finite_step_keeps_the_last_good_state_and_records_itself():
  cfg = smoke()
  graphdef, _, rest = abstract_model(cfg.model)
  mesh = sharding.make_mesh(1)
  good = D.train_batch(cfg.data, 0, 3)
  bad = {**good, "weights": np.where(good["weights"] > 0, np.inf, 0).astype(np.float32)}   # loss inf
  params = loop.init_params(cfg.model, 0)
  opt_state = S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy="data")
  step = lambda p, o, batch, i, h: S.train_step(p, o, rest, batch, i, h, graphdef=graphdef, cfg=cfg.optim,
                                               steps=cfg.steps, mesh=mesh, strategy="data")
  params, opt_state, m = step(params, opt_state, good, 0, S.healthy())
  params, opt_state, m = step(params, opt_state, good, 1, m["health"])
  assert bool(m["finite"]) and int(m["health"]["bad_step"]) == -1
  last_good = leaves((params, opt_state))
  params, opt_state, m = step(params, opt_state, bad, 2, m["health"])
  assert not bool(m["finite"])
  assert int(m["health"]["bad_step"]) == 2 and not np.isfinite(float(m["health"]["loss"]))
  params, opt_state, m = step(params, opt_state, good, 3, m["health"])   # finite, but after a bad step
  assert bool(m["finite"]) and int(m["health"]["bad_step"]) == 2       # the first bad step stays recorded
  for a, b in zip(leaves((params, opt_state)), last_good):
    np.testing.assert_array_equal(a, b)                                # and the state stays as it was


def test_non_finite_or_too_small_settings_are_config_errors():
  for field, value in (("optim.lr", float("inf")), ("optim.lr", float("nan")), ("optim.eps", float("inf"))):
    with pytest.raises(C.ConfigError, match=rf"^{field}: must be a finite number"):
      smoke(**{field: value})
  with pytest.raises(C.ConfigError, match=r"^model.vocab_size: must be >= 512, the tokenizer's ids 0..511"):
    smoke(**{"model.vocab_size": 300})
  assert smoke(**{"optim.lr": 1e6}).optim.lr == 1e6   # legal: it diverges while training, see test_cli_train


@pytest.mark.slow
def test_a_run_written_before_the_implementation_settings_loads_and_resumes(tiny_run, tmp_path):
  """Its config.json has no model.attention/matmul/remat: they read as their defaults ('auto', False),
  the run resumes, and asking for another implementation is refused like any other change."""
  import shutil
  arm = str(tmp_path / "rope")
  shutil.copytree(tiny_run / "rope", arm)
  with open(tmp_path / "rope" / "config.json") as f:
    assert not {"attention", "matmul", "remat"} & set(json.load(f)["model"])
  cfg = C.override(loop.checkpoints.load_config(arm), {"steps": 2})
  assert (cfg.model.attention, cfg.model.matmul, cfg.model.remat) == ("auto", "auto", False)
  assert loop.train(cfg, arm, progress=False)["metrics"]["step"] == 2
  with pytest.raises(C.ConfigError, match=r"^model.attention: run directory .* holds a run with "
                                          r"model.attention='<absent>', not 'einsum'"):
    loop.check_run_dir(arm, C.override(cfg, {"model.attention": "einsum"}))
