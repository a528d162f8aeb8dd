"""analysis.studies.trajectory: a public trajectory (step<N> checkpoint folders) is traced as the
steps of one arm; bad flags are one line."""
import json

import pytest

from analysis.lab.cli import main


@pytest.mark.slow
def test_a_public_trajectory_is_traced_as_the_steps_of_one_arm(tmp_path, capsys):
  """Three self-built GPT-NeoX checkpoints (partial rotary, as Pythia) in step<N> folders: traced as
  one arm over steps, resumable, with emergence over those steps; an ordered list of folders gives
  the same steps."""
  from helpers import NEOX_CFG, bpe_tokenizer, neox_shapes, random_tensors, save_checkpoint
  tok = bpe_tokenizer()
  for seed, step in enumerate((0, 512, 4096)):
    folder = tmp_path / "pythia-tiny" / f"step{step}"
    folder.mkdir(parents=True)
    save_checkpoint(folder, random_tensors(neox_shapes(NEOX_CFG, tok.get_vocab_size()), seed=seed),
                    {**NEOX_CFG, "vocab_size": tok.get_vocab_size()})
    tok.save(str(folder / "tokenizer.json"))
  out = tmp_path / "trace"
  argv = ["trace", str(tmp_path / "pythia-tiny"), "--out", str(out), "--probes", "3", "--length", "32", "--no-plots"]
  assert main(argv) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert {(g["arm"], g["step"]) for g in summary["groups"]} == {("pythia-tiny", s) for s in (0, 512, 4096)}
  assert summary["arms"]["pythia-tiny"]["context"] == 64.0 and summary["arms"]["pythia-tiny"]["position"] == "rope"
  by_step = {g["step"]: g["stats"]["max_mean"][0] for g in summary["groups"] if (g["layer"], g["tensor"]) == (0, "q")}
  assert len(set(by_step.values())) == 3                        # three different models, not one read three times
  assert main(argv) == 0 and json.loads((out / "summary.json").read_text()) == summary   # resumed: nothing redone
  listed = tmp_path / "listed"
  assert main(["trace", *(str(tmp_path / "pythia-tiny" / f"step{s}") for s in (0, 512, 4096)), "--arm", "pythia-tiny",
               "--out", str(listed), "--probes", "3", "--length", "32", "--no-plots"]) == 0
  assert json.loads((listed / "summary.json").read_text())["groups"] == summary["groups"]
  capsys.readouterr()
  assert main(["trace", str(tmp_path / "pythia-tiny" / "step4096"), str(tmp_path / "pythia-tiny" / "step0"),
               "--out", str(tmp_path / "x")]) == 2
  assert capsys.readouterr().err.startswith("error: trajectory: the step<N> names must increase")


def test_bad_flags_are_one_line_before_writing(tmp_path, capsys):
  from helpers import write_checkpoint
  step0 = tmp_path / "traj" / "step0"
  step0.mkdir(parents=True)
  write_checkpoint(step0)   # heads 32 / 4 = 8 wide
  for flags, first in ((["--steps"], "error: --steps: names no step"),
                       (["--agree-k", "9"], f"error: agree_k: must be <= the head dim of {step0} (8); got 9")):
    assert main(["trace", str(tmp_path / "traj"), "--out", str(tmp_path / "x"), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(first), lines
  assert not (tmp_path / "x").exists()


def test_model_folders_are_numbered_by_their_step_names_or_all_by_position(tmp_path):
  from analysis.studies.trajectory import checkpoints
  from minilm.schema import ConfigError
  for name in ("step1000", "final", "a", "b"):
    (tmp_path / name).mkdir()
  assert checkpoints([str(tmp_path / "a"), str(tmp_path / "b")]) == {0: str(tmp_path / "a"), 1: str(tmp_path / "b")}
  with pytest.raises(ConfigError, match=r"^trajectory: name every model folder step<N> or none of them; "
                                        r"without a step: .*final$"):
    checkpoints([str(tmp_path / "step1000"), str(tmp_path / "final")])   # was {0: step1000, 1: final}
  traj = tmp_path / "traj"
  (traj / "step5").mkdir(parents=True)
  (traj / "step7").write_text("a file, not a checkpoint")
  assert checkpoints([str(traj)]) == {5: str(traj / "step5")}
