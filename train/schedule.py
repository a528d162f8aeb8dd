"""When to save and evaluate: log-spaced early (0, 1, 2, 4, ...), every N later, and the last step."""
from __future__ import annotations


def is_save_step(step: int, total: int, every: int, log_spaced: bool = True) -> bool:
  """True for step 0, powers of two below `every` (when log_spaced), multiples of `every`, and `total`."""
  if step == 0 or step == total or step % every == 0:
    return True
  return log_spaced and step < every and step & (step - 1) == 0


def save_steps(total: int, every: int, log_spaced: bool = True) -> list[int]:
  return [s for s in range(total + 1) if is_save_step(s, total, every, log_spaced)]


def is_eval_step(step: int, total: int, every: int) -> bool:
  """Every `every` steps after the start (0: never) and always at the end."""
  return step == total or (every > 0 and step > 0 and step % every == 0)
