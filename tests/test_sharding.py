"""Multi-device: data parallel and FSDP on 4 forced host devices give the one-device step.

The 4-device part runs in a subprocess (XLA_FLAGS must be set before jax starts), so the rest of
the suite keeps its single device.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_splits_the_largest_divisible_dimension():
  assert sharding.leaf_spec((512, 32), 4, "fsdp") == P("data")
  assert sharding.leaf_spec((32, 86), 4, "fsdp") == P("data")      # 86 is not divisible by 4
  assert sharding.leaf_spec((30, 64), 4, "fsdp") == P(None, "data")
  assert sharding.leaf_spec((6,), 4, "fsdp") == P()                # nothing divisible: replicated
  assert sharding.leaf_spec((), 4, "fsdp") == P()
  assert sharding.leaf_spec((512, 32), 4, "data") == P()
  assert sharding.leaf_spec((512, 32), 1, "fsdp") == P()


FOUR_DEVICES = textwrap.dedent("""
  import json, jax, numpy as np
  from minilm import schema as C
  from train import checkpoints, cli, data as D, loop, sharding, step as S
  assert jax.device_count() == 4
  # warmup 0 and Adam eps=1: both steps move the params by ~lr*g (see the tolerance in the test)
  cfg = C.override(cli.load("smoke", []).resolve("rope"), {"data.batch_size": 8, "model.n_layers": 1,
                                                           "optim.warmup_steps": 0, "optim.eps": 1.0})
  graphdef, abstract, rest = checkpoints.abstract_model(cfg.model)
  batches = [D.train_batch(cfg.data, cfg.seed, s) for s in range(2)]
  out = {"initial": [np.asarray(x).tolist() for x in jax.tree.leaves(loop.init_params(cfg.model, cfg.seed))],
         "tokens": cfg.data.batch_size * cfg.data.seq_len}
  for name, devices, strategy in (("one", 1, "data"), ("data", 4, "data"), ("fsdp", 4, "fsdp")):
    mesh = sharding.make_mesh(devices)
    shard = sharding.tree_shardings(abstract, mesh, strategy)
    params = jax.device_put(loop.init_params(cfg.model, cfg.seed), shard)
    opt = S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy=strategy)
    losses = []
    for s, batch in enumerate(batches):
      batch_sh = sharding.batch_sharding(mesh)
      assert sharding.host_rows(batch_sh, cfg.data.batch_size) == (0, cfg.data.batch_size)   # one process: all
      batch = sharding.put_rows(batch, batch_sh, cfg.data.batch_size)
      params, opt, m = S.train_step(params, opt, rest, batch, s, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps,
                                    mesh=mesh, strategy=strategy)
      losses.append(float(m["loss"]))
    embed = params["embed"]["embedding"][...]
    out[name] = {"losses": losses, "params": [np.asarray(x).tolist() for x in jax.tree.leaves(params)],
                 "embed_spec": str(embed.sharding.spec), "embed_devices": len(embed.sharding.device_set),
                 "shard_rows": embed.addressable_shards[0].data.shape[0]}
  try:
    sharding.check_batch(6, sharding.make_mesh(4))
  except C.ConfigError as err:
    out["error"] = str(err)
  print(json.dumps(out))
""")


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one = out["one"]
  eps = float(np.finfo(np.float32).eps)
  initial = [np.array(p) for p in out["initial"]]
  # The devices sum the same n tokens' losses and gradients in another order (per device, then an
  # all-reduce): relative error about (n-1)*eps/2 for terms of one sign, so n*eps bounds it.
  rel = out["tokens"] * eps
  # Params: each of the 2 steps (~lr*g with Adam eps=1) differs by n*eps of the whole move, and
  # p - step is rounded once per step (one spacing of the largest |p|).
  move = max(np.abs(np.array(a) - p).max() for a, p in zip(one["params"], initial))
  atol = 2 * (rel * move + np.spacing(max(np.abs(p).max() for p in initial)))
  assert move > 100 * atol   # the steps are real, far above the tolerance
  for name in ("data", "fsdp"):
    assert out[name]["losses"] == pytest.approx(one["losses"], rel=rel), name
    for a, b in zip(out[name]["params"], one["params"]):
      np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=atol, err_msg=name)
  assert out["data"]["embed_spec"] == str(P()) and out["data"]["shard_rows"] == 512
  assert out["fsdp"]["embed_spec"] == str(P("data")) and out["fsdp"]["shard_rows"] == 128
  assert out["fsdp"]["embed_devices"] == 4
  assert out["error"].startswith("data.batch_size: must be divisible by the 4 devices")
