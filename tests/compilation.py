"""How the tests compile (standard library only: conftest.py applies it before jax is imported).

The suite's programs are tiny and each runs a few times, so compiling them is most of its time.
Tests compile without XLA's optimization passes and with XLA:CPU's loop emitters in place of its
newer fusion emitters, which compile small programs in about half the time. A jaxlib may drop the
emitter flag, and XLA stops on a flag it does not know, so a short subprocess checks it first.

`MINILM_TEST_COMPILE=lab` runs the suite with the lab's own compilation; it passes both ways.
Processes that tests spawn (lab lanes, training jobs, hosts) inherit the settings, and
pytest-xdist's workers inherit them from the main process, which checks the flag once.
"""
import os
import subprocess
import sys

SWITCH = "MINILM_TEST_COMPILE"   # fast (the default) | lab
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_PROBE = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"


def apply() -> None:
  """Set the fast compilation in os.environ, unless the lab's is asked for. Idempotent: a worker
  finds the emitter flag already set by the main process and runs no check."""
  # no compiled program is kept on disk ($MINILM_CACHE/xla, minilm.cache.keep_compiled): a test's
  # output never depends on an earlier run's; tests/minilm/test_cache.py turns it on where it tests it
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  mode = os.environ.get(SWITCH, "fast")
  if mode not in ("fast", "lab"):
    raise SystemExit(f"{SWITCH}: must be 'fast' or 'lab'; got {mode!r}")
  if mode == "lab":
    return
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  flags = os.environ.get("XLA_FLAGS", "")
  if LOOP_EMITTERS in flags:
    return
  flags = f"{flags} {LOOP_EMITTERS}".strip()
  if subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, "XLA_FLAGS": flags},
                    capture_output=True).returncode == 0:
    os.environ["XLA_FLAGS"] = flags


def lab_env() -> dict[str, str]:
  """os.environ with the fast compilation taken out: a subprocess that compiles as the lab does."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(LOOP_EMITTERS, "").strip()
  return env | {SWITCH: "lab"}
