"""train.step: the weighted loss, gradient accumulation, the learning-rate schedule, and a non-finite
step that keeps the last good state and records itself."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import leaves, smoke
from minilm import schema as C
from train import data as D, loop, sharding, step as S
from train.checkpoints import abstract_model

EPS32 = float(np.finfo(np.float32).eps)


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
  assert float(lr(5)) == pytest.approx(5e-3, rel=ulps)                  # linear warm-up: half way, half the lr
  # cosine from lr to final_lr over steps 10..100: half way, final + (lr - final) * (1 + cos(pi / 2)) / 2
  assert float(lr(55)) == pytest.approx(1e-3 + 9e-3 / 2, rel=ulps)
  assert float(lr(85)) == pytest.approx(1e-3 + 9e-3 * (1 + math.cos(math.pi * 75 / 90)) / 2, rel=ulps)
  assert float(lr(100)) == pytest.approx(1e-3, rel=ulps)


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
