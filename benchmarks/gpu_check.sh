#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one go (about 5 minutes on one H100, 8.5 at most):
#   1. images/s of tl_dist's own code paths, bf16 + channels_last, 224 px, batch 256
#      (benchmarks/gpu_throughput.py): frozen-feature extraction on synthetic tensors already on the GPU vs
#      the real input pipeline (real >= 90% of synthetic: the pipeline is not the bottleneck), and full
#      fine-tuning (--freeze none) through engine.fit, synthetic vs real vs real with augmentation on the device
#      (TrivialAugment crops, random erasing, mixup/cutmix: its overhead, goal <= 5%);
#   2. an fp16 run of tl_dist/train.py (full fine-tune: the grad-scaler path, with a checkpoint);
#   3. the article's recipe on the real sample end to end, tl_dist vs the article's loop (benchmarks/bench.py).
# The sample is read from .device/caltech-101-mini (git-ignored; copy ../shared/data/caltech-101-mini there
# and carry it). Results go under $OUT: RESULTS.md (benchmarks/RESULTS.md with the GPU sections added),
# gpu_check.log, throughput.json, bench-gpu.json, fp16-metrics.json.
#
#   bash benchmarks/gpu_check.sh          on the GPU machine
#   bash benchmarks/gpu_check.sh --tiny   a quick run of the whole script on a CPU (tiny data and sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/tl_dist-gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/tl_dist-gpu-check.XXXXXX)
PY=$(command -v python3 || command -v python)
LAUNCH=("$PY" -m accelerate.commands.launch)  # `accelerate launch`, whether or not its script is on PATH
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

DATA=$REPO/.device/caltech-101-mini
if [[ "${1:-}" == "--tiny" ]]; then
    # 4 classes x 6 images of the sample, tiny sizes: checks that every step runs, in a minute or two.
    SRC=$REPO/.device/caltech-101-mini
    [[ -d $SRC ]] || SRC=$REPO/../shared/data/caltech-101-mini
    DATA=$WORK/tiny-data
    for c in $(ls "$SRC/caltech-101" | head -4); do
        mkdir -p "$DATA/caltech-101/$c"
        for f in $(ls "$SRC/caltech-101/$c" | head -6); do cp "$SRC/caltech-101/$c/$f" "$DATA/caltech-101/$c/"; done
    done
    THROUGHPUT=(--model vgg_tiny --image-size 32 --batch-size 8 --images 64 --train-steps 3)
    FP16=(--model vgg_tiny --image-size 32 --batch-size 4 --epochs 1)
    BENCH=(--image-size 32 --epochs 1 --max-samples 0 --repeats 1)
    PREC=bf16  # fp16 needs CUDA
else
    THROUGHPUT=()
    FP16=(--batch-size 64 --epochs 2)
    BENCH=(--image-size 224 --epochs 5 --max-samples 0 --repeats 1)
    PREC=fp16
fi
[[ -d $DATA ]] || { echo "no sample at $DATA: copy ../shared/data/caltech-101-mini there and carry it"; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'EOF'
import os, platform, torch, torchvision, accelerate
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"accelerate {accelerate.__version__}, cuda {torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}, {os.cpu_count()} CPUs")
EOF
[[ -f benchmarks/RESULTS.md ]] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
STATUS=0

elapsed "1/3 throughput (tl_dist's feature extraction and fine-tune loop, synthetic vs real)"
timeout 180 "$PY" benchmarks/gpu_throughput.py --data-dir "$DATA" --json "$OUT/throughput.json" "${THROUGHPUT[@]}" \
    || { echo "throughput FAILED ($?)"; STATUS=1; }

elapsed "2/3 $PREC run of tl_dist/train.py, full fine-tune (grad scaler), one checkpoint"
timeout 90 "${LAUNCH[@]}" --num_processes 1 tl_dist/train.py --data-dir "$DATA" --output-dir "$WORK/fp16" \
    --cache-dir "$WORK/cache" --weights none --freeze none --mixed-precision $PREC --channels-last \
    --checkpoint-every-epochs 1 --wandb-mode disabled "${FP16[@]}" \
    && cp "$WORK/fp16/metrics.json" "$OUT/fp16-metrics.json" \
    && "$PY" - "$OUT/fp16-metrics.json" <<'EOF' || { echo "$PREC run FAILED"; STATUS=1; }
import json, math, sys
m = json.load(open(sys.argv[1]))
t = m["train"]
print(f"{m['config']['mixed_precision_resolved']}: epoch losses {t['epoch_loss']}, skipped steps {t['skipped_steps']}, "
      f"train {t['images_per_second']:.0f} img/s, test loss {m['test']['loss']:.4f} acc {m['test']['accuracy']:.2%}")
assert all(math.isfinite(x) for x in t["epoch_loss"]) and t["skipped_steps"] < t["global_step"], "grad scaler path broken"
EOF
ls "$WORK/fp16/checkpoints" 2>/dev/null

elapsed "3/3 the article's recipe end to end: tl_dist vs the article's loop"
timeout 240 "$PY" benchmarks/bench.py --data-dir "$DATA" --work-dir "$WORK/bench" --results "$OUT/RESULTS.md" \
    --json "$OUT/bench-gpu.json" --label gpu-end-to-end --variant "--mixed-precision bf16 --channels-last" \
    --note "One repeat on a dedicated GPU machine; tl_dist's default is fp32 (TF32 matmuls/convs)." "${BENCH[@]}" \
    || { echo "bench FAILED ($?)"; STATUS=1; }

if [[ -f $OUT/throughput.json ]]; then
    "$PY" - "$OUT/throughput.json" "$OUT/RESULTS.md" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from bench import write_section
r = json.load(open(sys.argv[1]))
ok = lambda x, target: "yes" if x >= target else "NO"
rows = [
    ("frozen-feature extraction, synthetic input on the GPU", f"{r['features_synthetic_images_per_second']:,.0f}", "10,000 (first target)"),
    ("frozen-feature extraction, real pipeline (steady state)", f"{r['features_real_images_per_second']:,.0f}",
     f"real/synthetic {r['features_real_over_synthetic']:.1%} (>= 90%: {ok(r['features_real_over_synthetic'], 0.9)})"),
    ("frozen-feature extraction, real pipeline, first pass (worker start-up)", f"{r['features_real_images_per_second_first_pass']:,.0f}", ""),
    ("full fine-tune (--freeze none), synthetic input", f"{r['finetune_synthetic_images_per_second']:,.0f}", "3,000 (first target)"),
    ("full fine-tune (--freeze none), real pipeline", f"{r['finetune_real_images_per_second']:,.0f}",
     f"real/synthetic {r['finetune_real_over_synthetic']:.1%}"),
    ("full fine-tune, real pipeline + augmentation on the device (trivial, erasing, mixup/cutmix)",
     f"{r['finetune_augmented_images_per_second']:,.0f}",
     f"overhead {r['augmentation_overhead']:+.1%} (<= 5%: {ok(0.05, r['augmentation_overhead'])})"),
    ("JPEG decode + resize into the cache (all CPU threads)", f"{r['decode_images_per_second']:,.0f}", ""),
]
lines = ["<!-- bench:gpu-throughput -->", f"## gpu-throughput: {r['device']}", "",
         f"`python benchmarks/gpu_throughput.py` (run by benchmarks/gpu_check.sh): {r['model']}, {r['image_size']} px, "
         f"batch {r['batch_size']}, {r['precision']} autocast, channels_last {r['channels_last']}, "
         f"{r['loader_workers']} loader workers, steady state (after a warm-up pass/epoch).", "",
         "| what | images/s | target / note |", "|---|---|---|"]
lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
lines += ["", "<!-- /bench:gpu-throughput -->"]
write_section(__import__("pathlib").Path(sys.argv[2]), "gpu-throughput", "\n".join(lines) + "\n")
print("\n".join(lines))
EOF
fi
rm -rf "$WORK"
elapsed "done (status $STATUS); results in $OUT"
exit $STATUS
