"""train.evaluate: forced-choice accuracy equals greedy decoding's, and conflicts are scored by which
answer the model follows."""
import numpy as np
import pytest
from flax import nnx

from helpers import smoke
from minilm.generate import greedy
from train import data as D, evaluate, loop
from train.checkpoints import abstract_model


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
  cfg = smoke(**{"model.init_std": 0.5})   # wide logit margins: no near-ties for rounding to flip
  graphdef, _, rest = abstract_model(cfg.model)
  model = nnx.merge(graphdef, loop.init_params(cfg.model, 0), rest)
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
