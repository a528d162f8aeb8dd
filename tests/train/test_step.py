"""train.step: the weighted loss, gradient accumulation, the learning-rate schedule, the step as clipped
AdamW written out by hand, a non-finite step (loss or optimizer state) that keeps the last good state and
records itself, and stacked arms that step apart."""
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


def test_steps_are_adamw_after_global_norm_clipping_with_decay_on_matrices_only():
  """Four steps (lr 0, warm-up, peak, cosine) against AdamW written out in float64 numpy, each from the
  params the step before produced. clip_norm 0.5 is below every gradient norm here (1.1 to 1.3), so the
  clipping acts; Adam eps 1e-3 is above most clipped gradient elements (~1e-4), so the step depends on the
  gradient's scale (clip norm, unscaled sums) and not only on its sign; weight decay 0.5 is a visible share of
  every step, and norm scales (1.0) would visibly shrink under it."""
  hyper = dict(lr=5e-3, final_lr=5e-4, warmup_steps=2, weight_decay=0.5, b1=0.8, b2=0.9, eps=1e-3, clip_norm=0.5)
  cfg = smoke(steps=6, **{f"optim.{k}": v for k, v in hyper.items()})
  graphdef, _, rest = abstract_model(cfg.model)
  params = loop.init_params(cfg.model, 0)
  opt_state = S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  decayed = ["'scale'" not in name for name in names]   # kernels and the embedding, not the RMSNorm scales
  assert decayed.count(False) == 2 * cfg.model.n_layers + 1
  grad_fn = jax.jit(jax.value_and_grad(S.weighted_loss), static_argnums=1)
  mu = nu = [0.0] * len(names)
  for i in range(4):
    batch = D.train_batch(cfg.data, 0, i)
    before = leaves(params)
    loss, grads = grad_fn(params, graphdef, rest, batch)
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = math.sqrt(sum((x ** 2).sum() for x in g))
    assert norm > 2 * hyper["clip_norm"]   # the clipping acts
    g = [x * hyper["clip_norm"] / norm for x in g]
    mu = [hyper["b1"] * m + (1 - hyper["b1"]) * x for m, x in zip(mu, g)]
    nu = [hyper["b2"] * v + (1 - hyper["b2"]) * x ** 2 for v, x in zip(nu, g)]
    t, w = i + 1, hyper["warmup_steps"]
    lr = (hyper["lr"] * i / w if i < w else hyper["final_lr"] + (hyper["lr"] - hyper["final_lr"])
          * (1 + math.cos(math.pi * (i - w) / (cfg.steps - w))) / 2)
    expected = [p - lr * ((m / (1 - hyper["b1"] ** t)) / (np.sqrt(v / (1 - hyper["b2"] ** t)) + hyper["eps"])
                          + hyper["weight_decay"] * p * d) for p, m, v, d in zip(before, mu, nu, decayed)]
    params, opt_state, metrics = S.train_step(params, opt_state, rest, batch, i, graphdef=graphdef, cfg=cfg.optim,
                                              steps=cfg.steps)
    assert float(metrics["lr"]) == pytest.approx(lr, rel=8 * EPS32)   # as in the schedule test above
    # loss, gradient norm and weight sum: sums over n = B*T tokens in another order than here, n*eps relative
    n = batch["weights"].size
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=n * EPS32)
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=n * EPS32)
    assert float(metrics["weight"]) == pytest.approx(batch["weights"].sum(dtype=np.float64), rel=n * EPS32)
    # Each element's step is a few float32 operations on a gradient that is rounded differently here (the
    # relative error of both is far below 1e-5 of the largest step), plus the rounding of p - step (one
    # spacing of the largest |p|). Step 0 (lr 0) leaves the params exactly as they were.
    move = max(np.abs(e - p).max() for e, p in zip(expected, before))
    atol = 1e-5 * move + np.spacing(max(np.abs(p).max() for p in before))
    assert i == 0 or move > 100 * atol
    for name, got, want in zip(names, leaves(params), expected):
      np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {i} {name}")


def _with_inf_in_adam_second_moment(opt_state):
  """One element of the first matrix's second moment set to inf: Adam divides its update by sqrt(inf), so
  the loss, gradient norm and updated params stay finite and only the optimizer state is not."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
  k = next(i for i, (path, x) in enumerate(flat) if ".nu" in jax.tree_util.keystr(path) and x.ndim == 2)
  return jax.tree.unflatten(treedef, [x.at[0, 0].set(np.inf) if i == k else x for i, (_, x) in enumerate(flat)])


def test_a_non_finite_optimizer_state_is_a_bad_step_and_the_first_bad_step_stays_recorded():
  cfg = smoke()
  graphdef, _, rest = abstract_model(cfg.model)
  mesh = sharding.make_mesh(1)
  batch = D.train_batch(cfg.data, 0, 3)
  params = loop.init_params(cfg.model, 0)
  opt_state = _with_inf_in_adam_second_moment(
      S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy="data"))
  step = lambda p, o, i, h: S.train_step(p, o, rest, batch, i, h, graphdef=graphdef, cfg=cfg.optim,
                                         steps=cfg.steps, mesh=mesh, strategy="data")
  before = leaves((params, opt_state))
  params, opt_state, m = step(params, opt_state, 5, S.healthy())
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])) and not bool(m["finite"])
  assert int(m["health"]["bad_step"]) == 5                 # the record holds this step's own numbers
  assert float(m["health"]["loss"]) == float(m["loss"]) and float(m["health"]["grad_norm"]) == float(m["grad_norm"])
  params, opt_state, m = step(params, opt_state, 6, m["health"])   # the state kept has the inf: bad again
  assert not bool(m["finite"]) and int(m["health"]["bad_step"]) == 5   # the first bad step stays recorded
  for a, b in zip(leaves((params, opt_state)), before):
    np.testing.assert_array_equal(a, b)


def test_a_batch_without_weight_is_a_finite_step_of_loss_zero():
  cfg = smoke()
  graphdef, _, rest = abstract_model(cfg.model)
  mesh = sharding.make_mesh(1)
  batch = D.train_batch(cfg.data, 0, 3)
  batch = {**batch, "weights": np.zeros_like(batch["weights"])}
  params = loop.init_params(cfg.model, 0)
  opt_state = S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy="data")
  _, _, m = S.train_step(params, opt_state, rest, batch, 0, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps,
                         mesh=mesh, strategy="data")
  assert bool(m["finite"]) and int(m["health"]["bad_step"]) == -1
  assert (float(m["loss"]), float(m["grad_norm"]), float(m["weight"])) == (0.0, 0.0, 0.0)


def test_stacked_arms_step_each_on_its_own_batch_with_its_own_health():
  """Two seeds stacked step as their single steps do (to the tolerance of the accumulation test: the vmapped
  step sums in another order; warm-up 0 and Adam eps 1 for the same reasons), and a bad batch of arm 1
  freezes and records arm 1 alone."""
  cfg = smoke(**{"optim.warmup_steps": 0, "optim.eps": 1.0})
  graphdef, _, rest = abstract_model(cfg.model)
  step = lambda p, o, b, i, h: S.train_step(p, o, rest, b, i, h, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps)
  initial = [loop.init_params(cfg.model, seed) for seed in (0, 1)]
  opt = [S.init_opt_state(p, cfg=cfg.optim, steps=cfg.steps) for p in initial]
  batches = [D.train_batch(cfg.data, seed, 0) for seed in (0, 1)]
  params, opt_state = loop.stack_arms(initial), loop.stack_arms(opt)
  stacked_step = S.stacked(step)
  params, opt_state, m = stacked_step(params, opt_state, loop.stack_arms(batches), 0, loop.stack_arms([S.healthy()] * 2))
  n = batches[0]["weights"].size
  for k in range(2):
    start = leaves(initial[k])
    single, _, single_m = step(initial[k], opt[k], batches[k], 0, None)
    assert float(m["loss"][k]) == pytest.approx(float(single_m["loss"]), rel=n * EPS32)
    max_step = max(np.abs(a - p).max() for a, p in zip(leaves(single), start))
    atol = n * EPS32 * max_step + np.spacing(max(np.abs(p).max() for p in start))
    for a, b in zip(leaves(jax.tree.map(lambda x: x[k], params)), leaves(single)):
      np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"arm {k}")
  after_one = leaves((params, opt_state))
  bad = {**batches[1], "weights": np.full_like(batches[1]["weights"], np.nan)}
  params, opt_state, m = stacked_step(params, opt_state, loop.stack_arms([batches[0], bad]), 1, m["health"])
  assert m["finite"].tolist() == [True, False] and m["health"]["bad_step"].tolist() == [-1, 1]
  for a, b in zip(leaves((params, opt_state)), after_one):
    np.testing.assert_array_equal(a[1], b[1])   # arm 1 kept its state
    assert not np.array_equal(a[0], b[0])       # arm 0 stepped on
