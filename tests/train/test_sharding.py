"""Multi-device: data parallel and FSDP on 4 forced host devices give the one-device step, and two
real processes (jax.distributed over a localhost coordinator, one CPU device each) train the smoke
model data-parallel, each generating only its own rows, and match one process on one device; the
same two processes run loop.train through checkpoints, resume and a damaged step.

The multi-device parts run in subprocesses (XLA_FLAGS must be set before jax starts), so the rest of
the suite keeps its single device.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import ROOT, damage
from train import checkpoints, loop, sharding


def test_fsdp_splits_the_largest_divisible_dimension():
  assert sharding.leaf_spec((512, 32), 4, "fsdp") == P("data")
  assert sharding.leaf_spec((32, 86), 4, "fsdp") == P("data")      # 86 is not divisible by 4
  assert sharding.leaf_spec((30, 64), 4, "fsdp") == P(None, "data")
  assert sharding.leaf_spec((6,), 4, "fsdp") == P()                # nothing divisible: replicated
  assert sharding.leaf_spec((), 4, "fsdp") == P()
  assert sharding.leaf_spec((512, 32), 4, "data") == P()
  assert sharding.leaf_spec((512, 32), 1, "fsdp") == P()


def test_a_mesh_that_leaves_out_a_process_is_one_line(monkeypatch):
  """Two hosts of two devices each: a mesh over the first two leaves process 1 without rows."""
  import jax
  from minilm.schema import ConfigError
  monkeypatch.setattr(jax, "devices", lambda: [type("D", (), {"process_index": i // 2})() for i in range(4)])
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(ConfigError, match=r"^parallel.devices: the first 2 of 4 devices hold none of process 1's, "):
    sharding.make_mesh(2)
  monkeypatch.setattr(sharding, "Mesh", lambda devices, axes: list(devices))   # fakes are not devices
  assert len(sharding.make_mesh(3)) == 3 and len(sharding.make_mesh(0)) == 4


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


# ------------------------------------------------------------------------------ two processes

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
  params = sharding.put_global(loop.init_params(cfg.model, cfg.seed), sharding.tree_shardings(abstract, mesh, "data"))
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


def _launch(commands: list[tuple[list[str], dict]], names: list) -> list[tuple[str, str]]:
  """Run every (argv, env) at once, output to files under `names` (a full pipe would stall a process
  its peer waits for); (stdout, stderr) of each. The first process to fail stops them all (its peers
  would wait for it)."""
  procs = []
  try:
    for (argv, env), name in zip(commands, names):
      procs.append(subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env},
                                    stdout=open(f"{name}.out", "w"), stderr=open(f"{name}.err", "w")))
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      failed = [name for p, name in zip(procs, names) if p.poll()]
      assert not failed, open(f"{failed[0]}.err").read()[-3000:]
      time.sleep(0.1)
    for p, name in zip(procs, names):
      assert p.poll() == 0, f"{name}: " + ("still running after 300 s" if p.poll() is None
                                           else open(f"{name}.err").read()[-3000:])
  finally:
    for p in procs:
      p.kill()
      p.wait()
  return [(open(f"{name}.out").read(), open(f"{name}.err").read()) for name in names]


def _run(script: str, runs: list[tuple[int, int]], tmp_path, *args: str, tag: str = "") -> list[dict]:
  """`script` once per (process, processes) of `runs`, all at once (the processes of a group meet at
  one localhost coordinator), with `args` after theirs; the last JSON line each printed, and its stderr."""
  port = str(_free_port())
  outs = _launch([([sys.executable, "-c", script, str(i), str(n), port, *args], {}) for i, n in runs],
                 [tmp_path / f"{tag}{i}of{n}" for i, n in runs])
  return [{**json.loads(out.strip().splitlines()[-1]), "stderr": err} for out, err in outs]


def _tolerance(one: dict, steps: int) -> tuple[float, float, float]:
  """(rel, atol, move) for a run of `steps` data-parallel steps against one process's `one`.

  The two devices sum the n tokens' losses and gradients in another order (per process, then an
  all-reduce): relative error about (n-1)*eps/2 for terms of one sign, so n*eps bounds it. Params:
  each step (~lr*g with Adam eps=1) differs by n*eps of the whole move, and p - step is rounded once
  per step (one spacing of the largest |p|)."""
  rel = one["tokens"] * float(np.finfo(np.float32).eps)
  initial = [np.array(p) for p in one["initial"]]
  move = max(np.abs(np.array(a) - p).max() for a, p in zip(one["params"], initial))
  return rel, steps * (rel * move + np.spacing(max(np.abs(p).max() for p in initial))), move


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  outs = _run(WORKER, [(0, 2), (1, 2), (0, 1)], tmp_path)
  first, second, one = outs
  assert first["devices"] == second["devices"] == 2 and one["devices"] == 1
  assert first["rows"] == [0, 2] and second["rows"] == [2, 4] and one["rows"] == [0, 4]   # each its own rows
  assert first["losses"] == second["losses"] and first["params"] == second["params"]   # one global state
  rel, atol, move = _tolerance(one, STEPS)
  assert move > 100 * atol   # the steps are real, far above the tolerance
  assert first["losses"] == pytest.approx(one["losses"], rel=rel)
  for a, b in zip(first["params"], one["params"]):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=atol)


LOOP = textwrap.dedent("""
  import json, sys
  import jax
  process, processes, port, root, strategy, stop_at = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7]
  if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process)
  from minilm import schema as C
  from train import cli, loop
  cfg = C.override(cli.load("smoke", []).resolve("rope"), {
      "data.stream": "row", "optim.warmup_steps": 0, "optim.eps": 1.0,   # as WORKER's
      "steps": 6, "checkpoint.every": 2, "eval.every": 3, "parallel.strategy": strategy})
  arm_dir = f"{root}/{strategy}{processes}"
  if len(sys.argv) > 7 and process == int(sys.argv[7].split(":")[0]):   # 'p:s': process p alone finds step s damaged
    from train import checkpoints
    read, damaged = checkpoints._restore_json, int(sys.argv[7].split(":")[1])
    def unreadable(mngr, step):
      meta = read(mngr, step)
      if step == damaged:
        raise checkpoints.DamagedCheckpoint(f"step {step}: damaged as process {process} read it")
      return meta
    checkpoints._restore_json = unreadable
  if stop_at != "-":   # stopped as if killed after step `stop_at`, then resumed
    loop.train(cfg, arm_dir, progress=False, stop_at=int(stop_at))
  print(json.dumps(loop.train(cfg, arm_dir, progress=False)))
""")


def _params(arm_dir) -> list[np.ndarray]:
  model, _ = checkpoints.load_model(str(arm_dir))
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _losses(arm_dir) -> list[tuple[int, float]]:
  return [(row["step"], row["loss"]) for row in map(json.loads, open(arm_dir / "metrics.jsonl"))]


@pytest.mark.slow
def test_two_processes_checkpoint_resume_and_set_aside_like_one(tmp_path):
  """loop.train across two processes, params split between them ('fsdp'; replicated ones, 'data', in
  the command's test below): orbax saves from both, a run stopped after step 3 resumes from step 2,
  and it ends like one process. A latest step whose read fails in one process only (a shard only
  process 1 reads, cut short) is moved aside once, by process 0 with the other waiting, and both
  redo it from the step before, to the same weights; so is a step whose metadata only process 1
  finds damaged."""
  _run(LOOP, [(0, 2), (1, 2), (0, 1)], tmp_path, str(tmp_path), "fsdp", "3")
  two, one = tmp_path / "fsdp2", tmp_path / "fsdp1"   # one device: nothing to split, the plain step
  cfg = checkpoints.load_config(str(one))
  initial = [np.asarray(x) for x in jax.tree.leaves(loop.init_params(cfg.model, cfg.seed))]
  rel, atol, move = _tolerance({"tokens": cfg.data.batch_size * cfg.data.seq_len, "initial": initial,
                                "params": _params(one)}, cfg.steps)
  assert move > 100 * atol
  assert checkpoints.available_steps(two) == checkpoints.available_steps(one) == [0, 1, 2, 4, 6]
  assert [s for s, _ in _losses(two)] == [s for s, _ in _losses(one)] == [1, 2, 3, 4, 6]   # row 3 redone once
  assert [json.loads(r)["step"] for r in open(two / "eval.jsonl")] == [3, 6]
  assert [l for _, l in _losses(two)] == pytest.approx([l for _, l in _losses(one)], rel=rel)
  params = _params(two)
  for a, b in zip(params, _params(one)):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)

  damage(str(two), 6, "truncate", under="ocdbt.process_1")   # and process 1 alone finds step 4 damaged
  first, second = _run(LOOP, [(0, 2), (1, 2)], tmp_path, str(tmp_path), "fsdp", "-", "1:4", tag="again")
  assert first["stderr"].count("moved to") == 2 and "moved to" not in second["stderr"]
  assert "checkpoints/6): another process read it damaged; moved to" in first["stderr"]
  assert "checkpoints/4): another process read it damaged; moved to" in first["stderr"]
  assert "checkpoints/6): cannot be read (" in second["stderr"]   # each process says what it found
  assert "step 4: damaged as process 1 read it" in second["stderr"]
  assert sorted(os.listdir(two / checkpoints.DAMAGED)) == ["4", "6"]
  assert checkpoints.available_steps(two) == [0, 1, 2, 4, 6]
  for a, b in zip(_params(two), params):   # the same two-process program from step 2: the same bits
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_train_command_runs_on_two_processes_like_on_one(tmp_path):
  """`python -m train ... --distributed` on two processes, set up as docs/training.md says (the
  coordinator, process count and index in the environment), writes one run like the command's on
  one process; process 1 prints no evaluation lines."""
  argv = [sys.executable, "-m", "train", "smoke", "--arms", "rope", "--no-progress", "--set", "data.stream=row",
          "optim.warmup_steps=0", "optim.eps=1.0", "steps=4", "checkpoint.every=2", "eval.every=2", "--out"]
  coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
  (out0, err0), (out1, err1), _ = _launch(
      [([*argv, str(tmp_path / "two"), "--distributed"], {**coordinator, "JAX_PROCESS_ID": str(i)}) for i in (0, 1)]
      + [([*argv, str(tmp_path / "one")], {})], [tmp_path / "cli0", tmp_path / "cli1", tmp_path / "cli"])
  two, one = tmp_path / "two" / "smoke" / "rope", tmp_path / "one" / "smoke" / "rope"
  assert (two / "config.json").read_text() == (one / "config.json").read_text()
  assert checkpoints.available_steps(two) == checkpoints.available_steps(one) == [0, 1, 2, 4]
  assert [s for s, _ in _losses(two)] == [s for s, _ in _losses(one)] == [1, 2, 4]
  cfg = checkpoints.load_config(str(one))
  initial = [np.asarray(x) for x in jax.tree.leaves(loop.init_params(cfg.model, cfg.seed))]
  rel, atol, move = _tolerance({"tokens": cfg.data.batch_size * cfg.data.seq_len, "initial": initial,
                                "params": _params(one)}, cfg.steps)
  assert move > 100 * atol
  assert [l for _, l in _losses(two)] == pytest.approx([l for _, l in _losses(one)], rel=rel)
  for a, b in zip(_params(two), _params(one)):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
  assert (out0 + err0).count("step 4:") == 1 and "step 4:" not in out1 + err1
