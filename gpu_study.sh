#!/usr/bin/env bash
# Fill one GPU for up to TOTAL_S seconds: bench.py on CUDA, then the convergence study on the blog's full recipe
# (30 runs: dropout_num 0, 1, 8 x seeds 42-51) with --workers, then as much of the samples study as fits.
# Runs still training at the deadline are stopped at a step boundary; their finished epochs are kept.
#
#   bash gpu_study.sh        # DATA=data/cifar10-jpeg.tar.gz, PYTHON=python3, WORKERS=4, TOTAL_S=560
#
# Everything lands in outputs/gpu/ (bench-*/, study-full/ with convergence.md/.png and samples.md/.png,
# times.txt with the seconds per run and how busy the GPU and the CPU were, gpu-utilization.csv); with $OUT
# set, also packed as $OUT/gpu.tar.gz (one file, for a remote machine that sends back few). Commit the runs'
# config.json, metrics.json and metrics.csv, the tables and the figures.
#
# Run time: at most TOTAL_S, 560 s (9.3 minutes), so that a remote command with a 10-minute limit holds it.
# The bench is short blocks, each model and precision stopped at BENCH_S or at the deadline, peak memory for
# miniresnet in bf16 only; the studies get what is left up to the deadline, TOTAL_S - 45 s; those last 45 s
# stop the workers, draw the figures and pack the folder.
# The data must be on the machine: copy ../shared/data/cifar10-jpeg.tar.gz to data/ (git-ignored).
# Why 4 workers: the best of three measured on H200s (torch 2.11.0, docs/gpu-study.md), each worker with the CPU's
# cores shared out as threads: six without MPS (2 threads each) trained an epoch in 14 s side by side, 47 s of
# device time a run; nine under MPS (1 thread each) in 20 to 25 s, about 50 s; four under MPS (4 threads each) in
# 7 to 8 s, about 38 s. Which of the three changes made four faster is not separated. At about 150 s a run, four
# workers finish some 12 runs in the window; a run cut at the deadline keeps its epochs only while the machine does.
# The full protocol leaves the precision to auto, so seeds not yet trained run in bf16 on these GPUs (seeds 42-46 ran
# in true fp32, when the protocol fixed it); about 0.58 PFLOP a run (0.54 of training: 69 GFLOP a step of 128, fwd+bwd, 7,820
# steps; the rest evaluation), so at the H200's 67 TFLOP/s of fp32 no run costs under about 9 s.
# Measured: 526 s in all on one H200 with the bench, 525 s on another without it (BENCH_S=0).
# The study's committed runs, PRIOR (docs/study-full: the H200s' and the CPUs'), are copied in first, so the studies go
# on from them (the seeds not yet trained) instead of training them again; a seed whose runs trained on a CPU is left
# to a CPU, as a pair shares its kind of device; BENCH_S=0 leaves the bench out. MPS=1
# (the default on a GPU) runs the studies under NVIDIA's multi-process service where the GPU has it; MPS=0, without.
# SEEDS (e.g. "52 53 54 55 56") trains those seeds in both studies instead of each study's own.
# SMOKE=1 runs the same steps on the CPU in a few minutes, on the smoke protocol (a check of this script).
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
WORKERS=${WORKERS:-4}
TOTAL_S=${TOTAL_S:-560}  # seconds for everything, counted from the start
BENCH_S=${BENCH_S:-75}  # at most, for each bench.py; 0: no bench
DRAW_S=45  # kept at the end to stop the workers (5 to 11 s seen), draw the figures, sum up and pack
DEST=${DEST:-outputs/gpu}
SEEDS=${SEEDS:-}  # empty: each study's own seeds
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu PROTOCOL=smoke MODELS=(miniresnet) BENCH=(--quick --steps 1 --repeats 2 --warmup 0 --batch_size 8 --memory_steps 0)
  WORKERS=2 DRAW_S=30 MPS=${MPS:-0}
else
  DEVICE=cuda PROTOCOL=full MODELS=(miniresnet resnet18) BENCH=(--steps 20 --repeats 3 --warmup 5)
fi
MPS=${MPS:-1}
PRIOR=${PRIOR:-docs/study-$PROTOCOL}  # the committed runs of these studies, one folder per setting
[ "$BENCH_S" -gt 0 ] || MODELS=()
deadline=$((TOTAL_S - DRAW_S))
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"
log() { echo "gpu_study.sh: $* (at ${SECONDS} s)" | tee -a "$DEST/times.txt"; }

log "start: $($PYTHON -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
# Decode the archive once, before several workers would each do it.
$PYTHON -c "import datasource, sys; datasource.load(sys.argv[1])" "$DATA" || exit 2
mkdir -p "$DEST/study-$PROTOCOL"
if [ -d "$PRIOR" ]; then  # the setting folders alone: the studies skip their finished runs and resume the others
  for setting in "$PRIOR"/*/; do
    [ -d "$setting" ] && [ "$(basename "$setting")" != logs ] && cp -r "$setting" "$DEST/study-$PROTOCOL/"
  done
  log "runs copied from $PRIOR: $(ls "$PRIOR"/*/*/metrics.json 2>/dev/null | wc -l)"
fi
for model in ${MODELS[@]+"${MODELS[@]}"}; do  # (the +: an empty array under set -u, on any bash)
  for precision in bf16 fp32; do  # the pipelines table has fp32 rows either way; this is every other table in fp32
    memory=(--memory_steps 0); [ "$model/$precision" = miniresnet/bf16 ] && memory=()
    limit=$((deadline - SECONDS < BENCH_S ? deadline - SECONDS : BENCH_S))
    [ "$limit" -gt 0 ] || break 2
    timeout -k 5 "$limit" $PYTHON bench.py --model "$model" --device "$DEVICE" --precision "$precision" "${BENCH[@]}" \
      ${memory[@]+"${memory[@]}"} --out "$DEST/bench-$model-$precision" > "$DEST/bench-$model-$precision.log" 2>&1
    log "bench $model $precision: exit $?"
  done
done

# NVIDIA's multi-process service lets the workers' kernels run side by side instead of taking turns; under it four
# workers were the fastest measured, though not shown to be faster for it (docs/gpu-study.md). It starts where the
# GPU has it, and the studies use it once one operation on the device has gone through it; else they run without
# it. The bench above ran without it, as before.
mps=off
if [ "$MPS" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  if nvidia-cuda-mps-control -d && timeout 60 $PYTHON -c "import torch; torch.ones(1, device='$DEVICE').sum().item()"; then
    mps=on
  else
    echo quit | nvidia-cuda-mps-control
    mps="off (started, but the device did not answer through it)"
  fi
fi
log "MPS: $mps"
# What limits the studies: the GPU's busy share and memory each second (nvidia-smi, where there is one), and the
# CPU's busy share over the whole window (/proc/stat), summarised at the end.
command -v nvidia-smi > /dev/null && { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits \
  -l 1 > "$DEST/gpu-utilization.csv" 2>/dev/null & sampler=$!; }
cpu_before=$(head -1 /proc/stat)
# {run: epochs} of the runs the studies find in their folder, as JSON: the summary counts only the epochs after them
held_before=$($PYTHON -c 'import json, pathlib, sys; f = pathlib.Path(sys.argv[1]); print(json.dumps({str(p.relative_to(f)):
  len(json.loads(p.read_text())) for p in f.glob("*/*/metrics.json")}))' "$DEST/study-$PROTOCOL")
# The studies, against the clock: SIGINT at the deadline reaches study.py, which passes it to each worker (each in
# its own session); they stop at a step boundary, keep their last epoch, and study.py waits for them.
study_start=$SECONDS
for study in convergence samples; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 30 ] || break
  timeout -s INT -k 20 "$left" $PYTHON study.py "$study" --protocol "$PROTOCOL" --data_dir "$DATA" \
    --output_dir "$DEST/study-$PROTOCOL" --workers "$WORKERS" ${SEEDS:+--seed $SEEDS} > "$DEST/study-$study.log" 2>&1
  log "study $study: exit $?"
done
study_seconds=$((SECONDS - study_start))
[ "$mps" = on ] && echo quit | nvidia-cuda-mps-control
cpu_after=$(head -1 /proc/stat)
[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
for study in convergence samples; do  # whatever finished, drawn (a study with no finished pair says so)
  $PYTHON study.py "$study" --compare "$DEST/study-$PROTOCOL" >> "$DEST/times.txt" 2>&1
done
# Device time per run: the studies' wall time over the epochs they trained (in runs' worth), not those they found.
$PYTHON - "$DEST/study-$PROTOCOL" "$study_seconds" "$WORKERS" "$cpu_before" "$cpu_after" "$DEST/gpu-utilization.csv" \
  "$held_before" <<'EOF' | tee -a "$DEST/times.txt"
import json, os, pathlib, sys
folder, seconds, workers, held_before = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[7])
(before, after), samples = ([int(x) for x in line.split()[1:]] for line in sys.argv[4:6]), pathlib.Path(sys.argv[6])
ticks = [b - a for a, b in zip(before, after)]  # user nice system idle iowait ...: idle and iowait are not busy
print(f"CPU busy during the studies: {1 - (ticks[3] + ticks[4]) / max(sum(ticks), 1):.0%} of {os.cpu_count()} cores")
lines = samples.read_text().splitlines() if samples.exists() else []
rows = [[float(x) for x in line.split(",")] for line in lines if line.replace(",", "").replace(" ", "").isdigit()]  # not [N/A]
if rows:
    print(f"GPU busy during the studies: {sum(r[0] for r in rows) / len(rows):.0f}% on average over {len(rows)} one-second "
          f"samples (nvidia-smi: the share of time a kernel ran), memory up to {max(r[1] for r in rows):.0f} MiB")
runs = [(json.loads((p.parent / "config.json").read_text())["epochs"], len(json.loads(p.read_text())),
         held_before.get(str(p.relative_to(folder)), 0)) for p in folder.glob("*/*/metrics.json")]  # (its, now, before)
finished = sum(now >= total > before for total, now, before in runs)
whole = sum((now - before) / total for total, now, before in runs)
print(f"{workers} workers, {seconds} s of studies: {finished} runs finished, {whole:.1f} runs' worth of epochs, "
      f"{seconds / max(whole, 1e-9):.1f} s of device time per run")
EOF
log "end"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu.tar.gz" --exclude='*.pt' --exclude='logs' -C "$(dirname "$DEST")" "$(basename "$DEST")"
fi
