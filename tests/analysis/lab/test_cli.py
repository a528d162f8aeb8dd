"""`python -m analysis` (analysis.lab.cli): the pretrained study is what its command line builds."""
from __future__ import annotations


def test_the_pretrained_study_is_what_its_command_line_builds():
  import argparse
  from analysis.lab import cli
  from analysis.massive.stats import StatConfig
  from analysis.studies.pretrained import PretrainedStudy
  ap = argparse.ArgumentParser()
  cli._pretrained_args(ap)
  direct = PretrainedStudy(model="random", probes=3, length=24, plots=False, stats=StatConfig(lam=3.0))
  assert cli.pretrained_study(ap.parse_args(["--model", "random", "--out", "x", "--probes", "3", "--length", "24",
                                             "--no-plots", "--lam", "3"])) == direct
  assert cli.pretrained_study(ap.parse_args(["--out", "x"])) == PretrainedStudy()
