"""Two real processes (jax.distributed over a localhost coordinator, one CPU device each) train the
smoke model data-parallel, each generating only its own rows, and match one process on one device."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

WORKER = textwrap.dedent("""
  import json, sys
  import jax
  process, processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process)
  import numpy as np
  from jax.experimental import multihost_utils
  from minilm import schema as C
  from train import checkpoints, cli, data as D, loop, sharding, step as S
  # warmup 0 and Adam eps=1: every step moves the params by ~lr*g (see the tolerance in the test)
  cfg = C.override(cli.load("smoke", []).resolve("rope"), {"data.stream": "row", "optim.warmup_steps": 0,
                                                           "optim.eps": 1.0})
  graphdef, abstract, rest = checkpoints.abstract_model(cfg.model)
  mesh = sharding.make_mesh(0)
  batch_sh = sharding.batch_sharding(mesh)
  params = jax.device_put(loop.init_params(cfg.model, cfg.seed), sharding.tree_shardings(abstract, mesh, "data"))
  opt = S.init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy="data")
  rows = sharding.host_rows(batch_sh, cfg.data.batch_size)
  losses = []
  for s in range(%d):
    batch = sharding.put_rows(D.train_batch(cfg.data, cfg.seed, s, rows), batch_sh, cfg.data.batch_size)
    params, opt, m = S.train_step(params, opt, rest, batch, s, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps,
                                  mesh=mesh, strategy="data")
    losses.append(float(m["loss"]))
  gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(params)]
  initial = jax.tree.leaves(loop.init_params(cfg.model, cfg.seed))
  print(json.dumps({"devices": jax.device_count(), "rows": rows, "losses": losses,
                    "tokens": cfg.data.batch_size * cfg.data.seq_len,
                    "params": [p.tolist() for p in gathered], "initial": [np.asarray(p).tolist() for p in initial]}))
""" % STEPS)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  port = str(_free_port())
  runs = [(0, 2), (1, 2), (0, 1)]
  procs = []
  for i, n in runs:   # output to files: a full pipe would stall a process its peer waits for at shutdown
    out, err = open(tmp_path / f"{i}of{n}.out", "w"), open(tmp_path / f"{i}of{n}.err", "w")
    procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(n), port], cwd=ROOT, env=env,
                                  stdout=out, stderr=err))
  outs = []
  for (i, n), p in zip(runs, procs):
    assert p.wait(timeout=300) == 0, (tmp_path / f"{i}of{n}.err").read_text()[-3000:]
    outs.append(json.loads((tmp_path / f"{i}of{n}.out").read_text().strip().splitlines()[-1]))
  first, second, one = outs
  assert first["devices"] == second["devices"] == 2 and one["devices"] == 1
  assert first["rows"] == [0, 2] and second["rows"] == [2, 4] and one["rows"] == [0, 4]   # each its own rows
  assert first["losses"] == second["losses"] and first["params"] == second["params"]   # one global state
  # The two devices sum the n tokens' losses and gradients in another order (per process, then an
  # all-reduce): relative error about (n-1)*eps/2 for terms of one sign, so n*eps bounds it. Params:
  # each step (~lr*g with Adam eps=1) differs by n*eps of the whole move, and p - step is rounded once
  # per step (one spacing of the largest |p|).
  rel = one["tokens"] * float(np.finfo(np.float32).eps)
  initial = [np.array(p) for p in one["initial"]]
  move = max(np.abs(np.array(a) - p).max() for a, p in zip(one["params"], initial))
  atol = STEPS * (rel * move + np.spacing(max(np.abs(p).max() for p in initial)))
  assert move > 100 * atol   # the steps are real, far above the tolerance
  assert first["losses"] == pytest.approx(one["losses"], rel=rel)
  for a, b in zip(first["params"], one["params"]):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=atol)
