"""train.evaluate: forced-choice accuracy equals greedy decoding's, and conflicts are scored by which
answer the model follows."""
import numpy as np
import pytest
from flax import nnx

from helpers import smoke
from minilm.generate import greedy
from train import data as D, evaluate, loop
from train.checkpoints import abstract_model


def _model():
  cfg = smoke(**{"model.init_std": 0.5})   # wide logit margins: no near-ties for rounding to flip
  graphdef, _, rest = abstract_model(cfg.model)
  return nnx.merge(graphdef, loop.init_params(cfg.model, 0), rest)


def _miss(token):
  """A one-token answer that is not `token`."""
  return np.asarray([(token + 1) % 256], np.int32)


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
  model = _model()
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


def test_accuracy_scores_answers_shorter_and_longer_than_the_alternatives():
  """Conflict alternatives of different lengths: greedy generates as many tokens as the longest of an
  example's answers and matches each answer as a prefix of them. Example 0's answer is the model's
  first token (its 3-token memory alternative is wrong); example 1 follows its 3-token memory
  answer (its 1-token context answer is wrong). Forced scoring must agree."""
  model = _model()
  prompts = np.random.default_rng(1).integers(0, 256, (2, 7)).astype(np.int32)
  own = np.asarray(greedy(model, prompts, 3))
  assert (own[:, 0] != own[:, 2]).all()   # a suffix of own[:3] is not its prefix
  examples = [
      D.Example("conflict", prompts[0], own[0, :1], "", {"context_answer": own[0, :1],
                                                        "memory_answer": np.concatenate([_miss(own[0, 0]), own[0, 1:]])}),
      D.Example("conflict", prompts[1], _miss(own[1, 0]), "", {"context_answer": _miss(own[1, 0]),
                                                             "memory_answer": own[1]}),
  ]
  expected = {"conflict": 0.5, "conflict.follows_context": 0.5, "conflict.follows_memory": 0.5, "conflict.other": 0.0}
  assert evaluate.accuracy(model, examples, method="greedy", batch=2) == expected
  assert evaluate.accuracy(model, examples, method="forced", batch=2) == expected


def test_summary_lists_the_family_scores_only():
  """One line of per-family accuracies: the conflict fractions (keys with a dot) stay out unless named."""
  scores = {"conflict": 0.5, "conflict.follows_context": 0.25, "conflict.follows_memory": 0.75, "passkey": 0.844}
  assert evaluate.summary(scores) == "conflict 0.50  passkey 0.84"
  assert evaluate.summary(scores, ["passkey", "conflict.follows_memory"]) == "passkey 0.84  conflict.follows_memory 0.75"
