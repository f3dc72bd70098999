#!/usr/bin/env bash
# Fill one GPU for about 9 minutes: bench.py on CUDA, then the convergence study on the blog's full recipe
# (30 runs: dropout_num 0, 1, 8 x seeds 42-51) with --workers, then as much of the samples study as fits.
# Runs still training at the deadline are stopped at a step boundary; their finished epochs are kept.
#
#   bash gpu_study.sh        # DATA=data/cifar10-jpeg.tar.gz, PYTHON=python3, WORKERS=12, BUDGET_S=360
#
# Everything lands in outputs/gpu/ (bench-*/, study-full/ with convergence.md/.png and samples.md/.png,
# times.txt); with $OUT set (a device machine's result folder) also packed as $OUT/gpu.tar.gz, since such a
# folder takes few files. Commit the runs' config.json and metrics.json, the tables and the figures.
#
# Expected run time on one H200: about 9 minutes in all. The bench is about 3 minutes (two models in bf16 and
# fp32, short blocks, peak memory for miniresnet in bf16 only); then the studies get BUDGET_S seconds (6 minutes).
# The data must be on the machine: copy ../shared/data/cifar10-jpeg.tar.gz to data/ (git-ignored) and carry it. At the 47 s of device time
# a full run cost with three processes, 7 minutes hold 9 runs; at the 15 s aimed for with 12 workers, 28.
# SMOKE=1 runs the same steps on the CPU in a minute, on the smoke protocol (a check of this script).
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
WORKERS=${WORKERS:-12}
BUDGET_S=${BUDGET_S:-360}  # seconds for the studies, counted from the end of the bench
DEST=${DEST:-outputs/gpu}
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu PROTOCOL=smoke MODELS=(miniresnet) BENCH=(--steps 1 --repeats 2 --warmup 0 --batch_size 8 --memory_steps 0)
  WORKERS=2
else
  DEVICE=cuda PROTOCOL=full MODELS=(miniresnet resnet18) BENCH=(--steps 50 --repeats 5 --warmup 10)
fi
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"
log() { echo "gpu_study.sh: $* (at ${SECONDS} s)" | tee -a "$DEST/times.txt"; }

log "start: $($PYTHON -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
# Decode the archive once, before several workers would each do it.
$PYTHON -c "import datasource, sys; datasource.load(sys.argv[1])" "$DATA" || exit 2
for model in "${MODELS[@]}"; do
  for precision in bf16 fp32; do  # the pipelines table has fp32 rows either way; this is every other table in fp32
    memory=(); [ "$model/$precision" = miniresnet/bf16 ] || memory=(--memory_steps 0)
    $PYTHON bench.py --model "$model" --device "$DEVICE" --precision "$precision" "${BENCH[@]}" "${memory[@]}" \
      --out "$DEST/bench-$model-$precision" > "$DEST/bench-$model-$precision.log" 2>&1
    log "bench $model $precision: exit $?"
  done
done

deadline=$((SECONDS + BUDGET_S))
# The studies, against the clock: SIGINT at the deadline reaches study.py, which passes it to each worker (each in
# its own session); they stop at a step boundary, keep their last epoch, and study.py waits for them.
study_start=$SECONDS
for study in convergence samples; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 30 ] || break
  timeout -s INT "$left" $PYTHON study.py "$study" --protocol "$PROTOCOL" --data_dir "$DATA" \
    --output_dir "$DEST/study-$PROTOCOL" --workers "$WORKERS" > "$DEST/study-$study.log" 2>&1
  log "study $study: exit $?"
done
study_seconds=$((SECONDS - study_start))
for study in convergence samples; do  # whatever finished, drawn (a study with no finished pair says so)
  $PYTHON study.py "$study" --compare "$DEST/study-$PROTOCOL" >> "$DEST/times.txt" 2>&1
done
# Device time per run: the studies' wall time over the runs they trained (unfinished ones by their epochs).
$PYTHON - "$DEST/study-$PROTOCOL" "$study_seconds" "$WORKERS" <<'EOF' | tee -a "$DEST/times.txt"
import json, pathlib, sys
folder, seconds, workers = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
runs = [(json.loads((p.parent / "config.json").read_text()), json.loads(p.read_text())) for p in folder.glob("*/*/metrics.json")]
finished = sum(len(history) >= config["epochs"] for config, history in runs)
whole = sum(len(history) / config["epochs"] for config, history in runs)
print(f"{workers} workers, {seconds} s of studies: {finished} runs finished, {whole:.1f} runs' worth of epochs, "
      f"{seconds / max(whole, 1e-9):.1f} s of device time per run")
EOF
log "end"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu.tar.gz" --exclude='*.pt' --exclude='logs' -C "$(dirname "$DEST")" "$(basename "$DEST")"
fi
