#!/usr/bin/env bash
# The first GPU run of --cuda_graph (graphstep.py), as one command: is the captured step right, and how fast is it?
#
#   bash gpu_graph_check.sh      # DATA=data/cifar10-jpeg.tar.gz, PYTHON=python3; under 9.5 minutes on an H100 or H200
#
# 1. The captured step against the eager one, step by step: 30 steps of miniresnet at M = 8 from the same weights and
#    data, fp32 and bf16, the largest difference in loss and in weights printed. They differ by design (Adam
#    capturable, the masks from the graph's Philox offsets), so the check is a bound: losses within 2% at every step
#    and weights within 1e-3 after 30 steps, or the script says it failed.
# 2. One epoch of the blog's recipe (50,000 images, M = 8, seed 42), eager and --cuda_graph, fp32: the two rows of
#    metrics, and the seconds of each epoch (the `seconds` column: training and evaluation).
# 3. bench.py --compile on CUDA: eager, compiled and graph steps side by side, with TFLOP/s, the fraction of peak and
#    the capture time, miniresnet in fp32 and bf16, resnet18 in bf16.
# Everything lands in outputs/graph-check/ (check.txt, the two runs, bench-*/) and, with $OUT set, $OUT/graph-check.tar.gz.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
DEST=${DEST:-outputs/graph-check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
log() { echo "gpu_graph_check.sh: $* (at ${SECONDS} s)" | tee -a "$DEST/check.txt"; }
log "start: $($PYTHON -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')" || exit 2

$PYTHON - <<'EOF' 2>&1 | tee -a "$DEST/check.txt"
import sys
import torch
import graphstep, train
from nn import build_model

def steps(graphed, precision, n=30):
    torch.manual_seed(0)
    model = build_model("miniresnet", 10, 8, 0.5).cuda().to(memory_format=torch.channels_last)
    lr = torch.tensor(1e-3, device="cuda") if graphed else 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True, capturable=graphed)
    step = train.make_step(model, optimizer, train.autocast_for(torch.device("cuda"), precision, graphed), graphed)
    g = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.manual_seed(2)
    losses = []
    for _ in range(n):
        x = torch.randn(128, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,), device="cuda", generator=g)
        losses.append(step(x, y)[1].item())
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

failed = False
for precision in ("fp32", "bf16"):
    train.hardware.configure_precision(precision)
    (eager, w_eager), (graphed, w_graphed) = steps(False, precision), steps(True, precision)
    loss_gap = max(abs(a - b) / abs(a) for a, b in zip(eager, graphed))
    weight_gap = (w_eager - w_graphed).abs().max().item()
    ok = loss_gap < 0.02 and weight_gap < 1e-3
    failed |= not ok
    print(f"{precision}: eager losses {eager[0]:.4f} .. {eager[-1]:.4f}, graphed {graphed[0]:.4f} .. {graphed[-1]:.4f}; "
          f"largest relative loss gap {loss_gap:.2e}, largest weight gap {weight_gap:.2e}: {'within' if ok else 'OUTSIDE'} the bound")
sys.exit(1 if failed else 0)
EOF
log "step check: exit ${PIPESTATUS[0]}"

for flag in "" --cuda_graph; do
  $PYTHON run.py --data_dir "$DATA" --output_dir "$DEST/epoch" --dropout_num 8 --epochs 1 --precision fp32 $flag \
    > "$DEST/epoch${flag:+-graph}.log" 2>&1
  log "one epoch ${flag:-eager}: exit $?; $(grep -E '^ +1 ' "$DEST/epoch${flag:+-graph}.log")"
done

for spec in miniresnet:fp32 miniresnet:bf16 resnet18:bf16; do
  model=${spec%:*} precision=${spec#*:}
  timeout -k 5 100 $PYTHON bench.py --quick --model "$model" --device cuda --precision "$precision" --compile --steps 20 \
    --repeats 3 --warmup 5 --memory_steps 0 --out "$DEST/bench-$model-$precision" > "$DEST/bench-$model-$precision.log" 2>&1
  log "bench $model $precision: exit $?"
  sed -n '/### Compiled step/,/^Compiling\|^Warming/p' "$DEST/bench-$model-$precision/bench.md" >> "$DEST/check.txt" 2>/dev/null
done
log "end"
[ -n "${OUT:-}" ] && tar czf "$OUT/graph-check.tar.gz" --exclude='*.pt' -C "$(dirname "$DEST")" "$(basename "$DEST")"
exit 0
