"""The one way a command ends on bad input: one line `error: <field or path>: <what is wrong>`, exit 2.

Bad settings raise ConfigError (or ValueError / FileNotFoundError) with that one line as message;
filesystem failures (full disk, read-only folder, a file where a folder should be) are OSErrors
named by their path. Neither ever reaches the user as a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from minilm import atomic

BAD_INPUT = 2


def last_error(lines) -> str | None:
  """The last `error: ...` line among a command's output lines, without the prefix (None if none)."""
  found = [line.strip() for line in lines if line.startswith("error:")]
  return found[-1][len("error:"):].strip() if found else None


def guarded(run: Callable[[], object]) -> int:
  """Call `run`; return 0, or print the one-line error of bad input to stderr and return 2."""
  try:
    run()
  except (ValueError, OSError) as err:   # ConfigError is a ValueError
    # An OSError raised by the system carries an errno and a path; one raised by the lab carries
    # its own one-line message.
    text = atomic.describe(err) if isinstance(err, OSError) and err.errno is not None else str(err)
    print(f"error: {text}", file=sys.stderr)
    return BAD_INPUT
  return 0
