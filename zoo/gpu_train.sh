#!/usr/bin/env bash
# Trains Newton-CGNet-10, -56 and -82 on the CIFAR-10 (JPEG-75) archive on one GPU, in one
# call (-10: towards the zoo's 88% target, which its CPU runs take about 10 hours for).
#
# For a lent device machine (see the device tool): JAX backend, bf16 mixed precision, the
# "+" augmentation, the paper's C10+ recipe with fewer epochs, NumPy input pipeline (that
# machine has no TensorFlow). Prepare here, in the repository root:
#   printf '/.whl/\n/.data/\n' >> .git/info/exclude
#   mkdir -p .whl .data && cp ../shared/wheels/gpu-py312/*.whl .whl/ \
#     && cp ../shared/datasets/cifar10-jpeg/train.tar.xz .data/
#   then run with carry [".whl", ".data"] (timeout 540 s; the three tars and logs are 6 files):
#   bash zoo/gpu_train.sh
# It writes to $OUT (default out/gpu) one tar per model: the run folder (best weights,
# config, preprocessing, history, curves, summary, state, legs) without backup/, logs/,
# model.keras and the last epoch's weights.
# Here: `tar -C runs -xf newton_cgnet82.tar && keras-newton zoo add --run
# runs/newton_cgnet82 --tag cifar10 --data ../shared/datasets/cifar10-jpeg/train.tar.xz`
# (evaluates and registers it; --data because the run's config names the archive by file
# name and sha256 only, and it must be the same archive: checked). A run stopped by its time
# limit has no summary.json: rerun it with more time, or fewer epochs.
#
# The models train at the same time on the one GPU (one run at batch 128 leaves it mostly
# idle; measurements in README.md, "GPU"), each with SECONDS_<depth> of wall time (default
# 480 s: with the install and the data decoding, about 8.5 minutes in all).
# `--time-budget` times its second epoch and fits the recipe's step schedule (lr / 10 at
# 50% and 75%) into the epochs that fit, so the run ends with a decayed learning rate
# inside its time; `timeout` kills it only if that fails (its best weights so far still
# come back). Each model's Keras output goes to $OUT/<model>.log (the ends are printed).
# WARMUP_<depth> epochs at lr 0.01 start the run (`--warmup-epochs`; default 1 for -82,
# whose seed-0 run diverged at lr 0.1 from the first step: README.md, "Warm-up"; else 0).
#
# Environment: DEPTHS (default "10 56 82"), SECONDS_<depth>, WARMUP_<depth>, EPOCHS_<depth>
# (at most this many epochs; default the recipe's 300), DATA (the archive), LIMIT
# (training images, for a smoke test), OUT, RUNS (run folders, default /tmp/runs),
# CACHE (default .gpu-cache: wheels, decoded data, compiled programs; see below),
# EXTRA_ARGS (more `keras-newton train` flags).
#
# Tested on CPU (tests/test_training.py::test_gpu_script_without_tensorflow) with
# TensorFlow hidden, DEPTHS="10 16" (2 and 4 epochs, WARMUP_16=1), on a small archive; run
# on an H200 on 2026-11-28 in its earlier, one-model-after-the-other form (README, "GPU").
#
# CONTINUE=<run> (a folder name in zoo/in_progress, or a path; several, space-separated,
# train side by side on the one GPU): continues that committed run instead (the GPU leg
# of zoo/in_progress/README.md), one model per run, with the
# data on the device (`--on-device`: augmentation and normalisation in the compiled step,
# STEPS_PER_EXECUTION steps per call in a loop, default 64: 39 for CIFAR's 351 steps; not
# yet measured on a GPU: if the log's epoch times are slow, try 1, no loop), bf16, for
# SECONDS_RUN of wall time (default 500; it pauses MARGIN s before, default 45, after the
# last epoch that fits: `--stop-after`), or until the run ends. It checks the folder's
# SHA256SUMS, trains a copy in $RUNS with `keras-newton train --resume` (the settings of
# its config.json; EXTRA_ARGS adds flags) and writes to $OUT: <run>.tar (the light state
# without weights: config, state, history, best.json, curves, legs, summary when the run
# ended, SHA256SUMS), <run>.last.weights.h5 and, when the best epoch is not the last,
# <run>.best.weights.h5 (each < 16 MB; no optimizer state), and <run>.log. Back here, with
# F the folder the files came back to (then commit zoo/in_progress/<run>):
#   rm -rf zoo/in_progress/<run> && tar -C zoo/in_progress -xf F/<run>.tar \
#     && for f in F/<run>.*.weights.h5; do cp "$f" "zoo/in_progress/<run>/${f##*/<run>.}"; done \
#     && (cd zoo/in_progress/<run> && sha256sum -c SHA256SUMS)
# Tested on CPU (tests/test_training.py::test_gpu_script_continues_a_run): a run created
# with `keras-newton train --config-only`, paused after epoch 1, restored as above, ended.
set -uo pipefail

DEPTHS=${DEPTHS:-10 56 82}
DATA=${DATA:-.data/train.tar.xz}
OUT=${OUT:-out/gpu}
RUNS=${RUNS:-/tmp/runs}
LIMIT=${LIMIT:-}

# The installed wheels, the decoded archive and JAX's compiled programs live in CACHE, an
# ignored folder of the checkout (.gitignore) that the device machine keeps between the
# calls of a warm session: a second call skips the install, the decoding and the
# compilation of the programs the first one compiled (a run continued).
CACHE=${CACHE:-$PWD/.gpu-cache}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 KERAS_NEWTON_HOME=${KERAS_NEWTON_HOME:-$CACHE/kn}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$CACHE/jax}
if [ -d .whl ]; then
  export PYTHONPATH=$CACHE/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import keras" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target "$CACHE/site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$DATA" ] || { echo "gpu_train.sh: no archive at DATA=$DATA" >&2; exit 2; }
mkdir -p "$OUT" "$RUNS"
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# Decode the archive into the cache once, before the runs read it side by side.
python3 -c "import sys; from keras_newton.data import load_dataset
print(len(load_dataset('cifar10', data=sys.argv[1])), 'training images')" "$DATA" || exit 1

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the runs share the GPU's memory

continue_run() {  # CONTINUE mode: the committed run $1, its light state back to $OUT
  local src=$1 start=$SECONDS seconds=${SECONDS_RUN:-500} margin=${MARGIN:-45}
  [ -d "$src" ] || src=zoo/in_progress/$1
  local name
  name=$(basename "$src")
  [ -f "$src/config.json" ] || { echo "gpu_train.sh: no run (config.json) in $src" >&2; return 2; }
  if [ -f "$src/SHA256SUMS" ]; then
    (cd "$src" && sha256sum -c --quiet SHA256SUMS) || { echo "gpu_train.sh: $src does not match its SHA256SUMS" >&2; return 2; }
  fi
  rm -rf "${RUNS:?}/$name" "$RUNS/snapshot/$name" && cp -r "$src" "$RUNS/$name" || return 2
  echo "== $name: continued for at most $seconds s (pause after $((seconds - margin)) s)"
  timeout "$seconds" python3 -m keras_newton train --resume --out "$RUNS/$name" --data "$DATA" \
    --mixed-precision --on-device --steps-per-execution "${STEPS_PER_EXECUTION:-64}" \
    --stop-after "$((seconds - margin))" --no-test --distribute none --verbose 2 \
    ${EXTRA_ARGS:-} > "$OUT/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start)) s"; tail -n 8 "$OUT/$name.log"
  python3 -m keras_newton zoo snapshot --run "$RUNS/$name" --to "$RUNS/snapshot/$name" || return 1
  tar -C "$RUNS/snapshot" -cf "$OUT/$name.tar" --exclude='*.weights.h5' "$name" || return 1
  for f in "$RUNS/snapshot/$name"/*.weights.h5; do cp "$f" "$OUT/$name.$(basename "$f")"; done
  ls -la "$OUT"
  return $code
}
wait_all() {  # waits for the background jobs $@; returns the last failure's code
  local status=0 pid
  for pid in "$@"; do
    wait "$pid" || status=$?
  done
  return $status
}
if [ -n "${CONTINUE:-}" ]; then  # several runs (space-separated) train side by side
  pids=()
  for run in $CONTINUE; do
    continue_run "$run" & pids+=($!)
  done
  wait_all "${pids[@]}"
  exit $?
fi
train() {  # model depth: trains, then writes $OUT/<model>.tar
  local model=$1 depth=$2 start=$SECONDS
  local epochs_var=EPOCHS_$depth seconds_var=SECONDS_$depth warmup_var=WARMUP_$depth
  local epochs=${!epochs_var:-} seconds=${!seconds_var:-480} warmup=${!warmup_var:-}
  [ -n "$warmup" ] || { [ "$depth" = 82 ] && warmup=1 || warmup=0; }
  echo "== $model: at most ${epochs:-300 (the recipe)} epochs, in $seconds s, warm-up $warmup"
  # 20 s of the time are left for starting Python and saving the model at the end.
  timeout "$seconds" python3 -m keras_newton train --model "$model" --dataset cifar10 \
    --data "$DATA" --augment --mixed-precision --time-budget $((seconds - 20)) --no-test \
    --warmup-epochs "$warmup" --out "$RUNS/$model" --verbose 2 \
    ${epochs:+--epochs "$epochs"} ${LIMIT:+--limit "$LIMIT"} ${EXTRA_ARGS:-} \
    > "$OUT/$model.log" 2>&1
  local code=$?
  echo "== $model: exit $code after $((SECONDS - start)) s"
  # The run folder without its backup, logs and model.keras, and the best weights without
  # the optimizer's momentum (about 11 MB for -82; the tool returns files up to 16 MB).
  if [ -f "$RUNS/$model/best.weights.h5" ]; then
    python3 -c "import h5py, sys
with h5py.File(sys.argv[1]) as src, h5py.File(sys.argv[2], 'w') as dst:
    for key in src:
        if key != 'optimizer':
            src.copy(key, dst)" "$RUNS/$model/best.weights.h5" "$RUNS/$model/best.weights.small"
    mv "$RUNS/$model/best.weights.small" "$RUNS/$model/best.weights.h5"
  fi
  [ -d "$RUNS/$model" ] && tar -C "$RUNS" -cf "$OUT/$model.tar" --exclude=backup \
    --exclude=logs --exclude=model.keras --exclude=last.weights.h5 "$model"
  return $code
}

pids=()
for depth in $DEPTHS; do
  train "newton_cgnet$depth" "$depth" & pids+=($!)
done
wait_all "${pids[@]}"
status=$?
for depth in $DEPTHS; do
  echo "== newton_cgnet$depth.log (end)"; tail -n 6 "$OUT/newton_cgnet$depth.log"
done
ls -la "$OUT"
exit $status
