#!/usr/bin/env bash
# The first GPU run of --cuda_graph (graphstep.py), as one command: is the captured step right, and how fast is it?
#
#   bash gpu_graph_check.sh      # DATA=data/cifar10-jpeg.tar.gz, PYTHON=python3; at most TOTAL_S = 540 s
#
# The data must be on the machine (data/ is git-ignored: copy ../shared/data/cifar10-jpeg.tar.gz there and carry it).
# 1. The captured step against the eager one, step by step, deterministic cuDNN: 30 steps of miniresnet at M = 8 from
#    the same weights and data, the lr cut tenfold at step 15 as the schedule does, fp32 and bf16. The eager reference
#    runs Adam capturable with a tensor lr too, so the two differ only in being replayed: the check asks for the same
#    bits (the losses and the weights), and says so or prints the largest gap. The gap to the eager run.py step (Adam
#    not capturable) is printed beside it, for information.
# 2. Two epochs of the blog's recipe (50,000 images, M = 8, seed 42), eager and --cuda_graph, fp32: the rows side by
#    side, and whether they agree within the stated bound (valid accuracy within 0.02, train loss within 5%: the
#    rounding of capturable Adam, compounded over 780 steps); epoch 2's seconds are the steady ones (epoch 1 pays for
#    cuDNN's autotuning and the captures).
# 3. bench.py --compile --quick on CUDA: eager, compiled, reduce-overhead and graph steps side by side, with TFLOP/s,
#    the fraction of peak and the compile or capture time, for miniresnet in fp32 and bf16 and resnet18 in bf16, each
#    cut at BENCH_S.
# Everything lands in outputs/graph-check/ (check.txt, the runs, bench-*/) and, with $OUT set, $OUT/graph-check.tar.gz.
# Exit 0 when both checks hold, 1 when one does not, 2 without CUDA or data.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
DEST=${DEST:-outputs/graph-check}
TOTAL_S=${TOTAL_S:-540}
BENCH_S=${BENCH_S:-90}
mkdir -p "$DEST" && : > "$DEST/check.txt"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
log() { echo "gpu_graph_check.sh: $* (at ${SECONDS} s)" | tee -a "$DEST/check.txt"; }
gpu=$($PYTHON -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())') || { log "no CUDA device"; exit 2; }
[ -e "$DATA" ] || { log "no data at $DATA: copy cifar10-jpeg.tar.gz there"; exit 2; }
log "start: $gpu"
failed=0

$PYTHON - <<'EOF' 2>&1 | tee -a "$DEST/check.txt"
import sys
import torch
import train
from bookkeeping import hardware
from nn import build_model

torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, not stops
torch.backends.cudnn.benchmark = False
cuda = torch.device("cuda")

def steps(graphed, capturable, precision, n=30):
    torch.manual_seed(0)
    model = build_model("miniresnet", 10, 8, 0.5).to(cuda, memory_format=torch.channels_last)
    lr = torch.tensor(1e-3, device=cuda) if capturable else 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True, capturable=capturable)
    step = train.make_step(model, optimizer, train.autocast_for(cuda, precision, graphed), graphed)
    g = torch.Generator(device=cuda).manual_seed(1)
    torch.cuda.manual_seed(2)
    losses = []
    for i in range(n):
        if i == n // 2:
            train.set_lr(optimizer, 1e-4)
        x = torch.randn(128, 3, 32, 32, device=cuda, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,), device=cuda, generator=g)
        losses.append(step(x, y)[1].item())
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

def gaps(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a[0], b[0])), (a[1] - b[1]).abs().max().item()

same = True
for precision in ("fp32", "bf16"):
    hardware.configure_precision(precision)
    graphed, eager, plain = steps(True, True, precision), steps(False, True, precision), steps(False, False, precision)
    bits = graphed[0] == eager[0] and torch.equal(graphed[1], eager[1])
    same &= bits
    print(f"{precision}: graphed losses {graphed[0][0]:.4f} .. {graphed[0][-1]:.4f}; against the eager capturable step: "
          + ("the same bits" if bits else "largest relative loss gap %.2e, weight gap %.2e" % gaps(graphed, eager))
          + "; against run.py's eager step (Adam not capturable): loss gap %.2e, weight gap %.2e" % gaps(graphed, plain))
sys.exit(0 if same else 1)
EOF
status=${PIPESTATUS[0]}; [ "$status" = 0 ] || failed=1
log "step check: exit $status"

for flag in "" --cuda_graph; do
  timeout -k 5 150 $PYTHON run.py --data_dir "$DATA" --output_dir "$DEST/epochs" --dropout_num 8 --epochs 2 \
    --precision fp32 --overwrite $flag > "$DEST/epochs${flag:+-graph}.log" 2>&1
  log "two epochs ${flag:-eager}: exit $?"
done
$PYTHON - "$DEST/epochs" <<'EOF' 2>&1 | tee -a "$DEST/check.txt"
import json, pathlib, sys
runs = {("graph" if "_graph_" in p.parent.name else "eager"): json.loads(p.read_text())
        for p in pathlib.Path(sys.argv[1]).glob("*/metrics.json")}
if set(runs) != {"eager", "graph"}:
    sys.exit(f"two epochs: missing {sorted({'eager', 'graph'} - set(runs))}")
for e, (a, b) in enumerate(zip(runs["eager"], runs["graph"]), 1):
    print(f"epoch {e}: eager train loss {a['train_loss']:.4f}, valid acc {a['valid_acc']:.4f}, {a['seconds']:.1f} s; "
          f"graph {b['train_loss']:.4f}, {b['valid_acc']:.4f}, {b['seconds']:.1f} s")
a, b = runs["eager"][-1], runs["graph"][-1]
ok = abs(a["valid_acc"] - b["valid_acc"]) <= 0.02 and abs(a["train_loss"] - b["train_loss"]) <= 0.05 * a["train_loss"]
print(f"two epochs: {'within' if ok else 'OUTSIDE'} the bound; epoch 2 took {b['seconds'] / a['seconds']:.2f}x the eager time")
sys.exit(0 if ok else 1)
EOF
status=${PIPESTATUS[0]}; [ "$status" = 0 ] || failed=1

for spec in miniresnet:fp32 miniresnet:bf16 resnet18:bf16; do
  model=${spec%:*} precision=${spec#*:}
  limit=$((TOTAL_S - SECONDS < BENCH_S ? TOTAL_S - SECONDS : BENCH_S))
  [ "$limit" -gt 10 ] || { log "no time left for bench $spec"; break; }
  timeout -k 5 "$limit" $PYTHON bench.py --quick --model "$model" --device cuda --precision "$precision" --compile \
    --steps 20 --repeats 3 --warmup 5 --memory_steps 0 --out "$DEST/bench-$model-$precision" \
    > "$DEST/bench-$model-$precision.log" 2>&1
  log "bench $model $precision: exit $?"
  sed -n '/### Compiled step/,/^Compiling\|^Warming/p' "$DEST/bench-$model-$precision/bench.md" >> "$DEST/check.txt" 2>/dev/null
done
log "end: $([ $failed = 0 ] && echo 'both checks hold' || echo 'a check failed')"
[ -n "${OUT:-}" ] && tar czf "$OUT/graph-check.tar.gz" --exclude='*.pt' -C "$(dirname "$DEST")" "$(basename "$DEST")"
exit $failed
