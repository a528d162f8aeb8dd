"""The optimizer and one jitted, buffer-donating train step over (params, optimizer state).

Weighted cross-entropy: sum(ce * weights) / sum(weights) over the whole batch. With gradient
accumulation the batch is split into micro-batches scanned in order and the sums are divided once
at the end, so the gradient equals the one of the full batch (up to float summation order).

The step checks on the device that the loss, the gradient norm and the updated state are finite. A
step that fails keeps the old params and optimizer state and records itself in `health`, which the
caller carries from step to step: from then on every step keeps the state as it was, so the last
good state stays intact until the host next reads the metrics (when it logs, and before every save).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from train import sharding
from train.config import OptimConfig


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to lr, then cosine down to final_lr at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(steps, cfg.warmup_steps + 1), end_value=cfg.final_lr)


def optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; weight decay on matrices only (not norm scales)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  adamw = optax.adamw(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw


def loss_sums(params, graphdef, rest, batch):
  """(sum of weighted token cross-entropy, sum of weights) of one (micro-)batch."""
  model = nnx.merge(graphdef, params, rest)
  logits_BxTxV = model(batch["inputs"])
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
  weights_BxT = batch["weights"].astype(jnp.float32)
  return (ce_BxT * weights_BxT).sum(), weights_BxT.sum()


def weighted_loss(params, graphdef, rest, batch):
  total, weight = loss_sums(params, graphdef, rest, batch)
  return total / jnp.maximum(weight, 1e-9)


def _grads(params, graphdef, rest, batch, accumulate: int):
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  if accumulate == 1:
    (total, weight), grads = grad_fn(params, graphdef, rest, batch)
    return total, weight, grads
  micro = jax.tree.map(lambda x: x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:]), batch)

  def body(carry, mb):
    total, weight, grads = carry
    (t, w), g = grad_fn(params, graphdef, rest, mb)
    return (total + t, weight + w, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (total, weight, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
  return total, weight, grads


def constrain(tree, mesh, strategy: str):
  """Pin every leaf to the strategy's sharding (a no-op without a mesh or on one device).

  On one CPU device the constraints still send the step through the SPMD partitioner, which made
  the 1M-parameter step 3.6x slower (it loses XLA:CPU's fast matmul fusions), hence the skip.
  """
  if mesh is None or mesh.devices.size == 1:
    return tree
  n = mesh.devices.size
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, sharding.leaf_spec(x.shape, n, strategy))), tree)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "mesh", "strategy"))
def init_opt_state(params, *, cfg: OptimConfig, steps: int, mesh=None, strategy: str = "data"):
  return constrain(optimizer(cfg, steps).init(params), mesh, strategy)


def healthy() -> dict:
  """The health record before any step: 'bad_step' -1 (no non-finite step yet), and the loss and
  gradient norm the first non-finite step will record."""
  return {"bad_step": jnp.int32(-1), "loss": jnp.float32(0), "grad_norm": jnp.float32(0)}


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _select(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


@functools.partial(jax.jit, donate_argnames=("params", "opt_state"),
                   static_argnames=("graphdef", "cfg", "steps", "mesh", "strategy"))
def train_step(params, opt_state, rest, batch, step_index, health=None, *, graphdef, cfg: OptimConfig,
               steps: int, mesh=None, strategy: str = "data"):
  """One AdamW update on `batch` -> (params, opt_state, metrics); params and opt_state are donated.

  metrics: loss, grad_norm, lr, weight, 'finite' (this step's check) and 'health' (pass it to the
  next step; None starts from healthy()). Everything static is hashable config, so every run with
  the same model and optimizer reuses one compiled step; `mesh`/`strategy` pin the outputs to the
  layout of the inputs (multi-device).
  """
  health = healthy() if health is None else health
  total, weight, grads = _grads(params, graphdef, rest, batch, cfg.accumulate)
  scale = 1.0 / jnp.maximum(weight, 1e-9)
  grads = jax.tree.map(lambda g: g * scale, grads)
  loss, grad_norm = total * scale, optax.tree.norm(grads)
  updates, new_opt_state = optimizer(cfg, steps).update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state))
  ok = finite & (health["bad_step"] < 0)   # after a bad step the state stays frozen at the last good one
  first_bad = ~finite & (health["bad_step"] < 0)
  health = _select(first_bad, {"bad_step": jnp.asarray(step_index, jnp.int32), "loss": loss, "grad_norm": grad_norm},
                   health)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(cfg, steps)(step_index), "weight": weight,
             "finite": finite, "health": health}
  params, opt_state = _select(ok, new_params, params), _select(ok, new_opt_state, opt_state)
  return constrain(params, mesh, strategy), constrain(opt_state, mesh, strategy), metrics


def stacked(step_fn):
  """step_fn(params, opt_state, batch, step_index, health) of one arm as a jitted step of several
  arms stacked on a leading axis of params, opt_state, batch and health (the step index is shared),
  params and opt_state donated: one compilation and one dispatch per step for all the arms."""
  return jax.jit(jax.vmap(step_fn, in_axes=(0, 0, 0, None, 0)), donate_argnums=(0, 1))
