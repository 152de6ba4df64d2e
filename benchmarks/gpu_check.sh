#!/usr/bin/env bash
# GPU readiness in one script (issue 24), at most ~8 minutes on a CUDA machine:
#   1. the machine: nvidia-smi, torch's CUDA build, cached hub weights (torch hub, Hugging Face)
#   2. the test suite's GPU tests (pytest -m gpu)
#   3. cifar-transfer train --budget 2m on CIFAR-10 (needs the batches at $DATA_DIR)
#   4. cifar-transfer bench: ResNet50 at 224 px, bf16, channels_last, train and infer
#   5. a 2-process nccl torchrun smoke run (needs 2 GPUs: nccl refuses two ranks on one GPU)
# and writes every figure to one JSON: $OUT_DIR/gpu_check.json (each step: status, seconds, figures).
#
#   DATA_DIR=shared/cifar10/cifar-10-batches-py OUT_DIR=$OUT bash benchmarks/gpu_check.sh
#
# Without CUDA every GPU step is recorded as skipped (the script still exits 0), so it can be
# tried anywhere; a failed step is recorded with the tail of its log and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-gpu_check}
DATA_DIR=${DATA_DIR:-../shared/cifar10/cifar-10-batches-py}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT_DIR"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
export PYTHONUNBUFFERED=1 CIFAR_TRANSFER_CACHE="$OUT_DIR/cache"

if [ ! -x "$PY" ]; then
    make setup >/dev/null || { echo "error: make setup failed: run it by hand to see why" >&2; exit 2; }
fi
CT=("$PY" -m cifar_transfer)
have_cuda() { "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; }
gpus() { "$PY" -c "import torch; print(torch.cuda.device_count())"; }

# step NAME LIMIT_S CMD...: runs CMD under a time limit, logs to $OUT_DIR/NAME.log, records it.
step() {
    local name=$1 limit=$2; shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    printf "%s\t%s\t%s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" >>"$STEPS"
    echo "$name: exit $rc"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STEPS"; echo "$1: skipped ($2)"; }

"$PY" - >"$OUT_DIR/machine.json" <<'PY'
import glob, json, os, platform, subprocess, torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
home = os.path.expanduser("~")
print(json.dumps({
    "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available(),
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "nvidia_smi": run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
    "cpu": platform.processor() or run(["sh", "-c", "lscpu | grep 'Model name'"]),
    "cached_torch_hub": sorted(os.path.basename(p) for p in glob.glob(f"{home}/.cache/torch/hub/checkpoints/*")),
    "cached_huggingface": sorted(os.path.basename(p) for p in glob.glob(f"{home}/.cache/huggingface/hub/*")),
}, indent=1))
PY

if have_cuda; then
    step gpu_tests 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider
    if [ -f "$DATA_DIR/data_batch_1" ]; then
        step budget_2m 200 "${CT[@]}" train --budget 2m --data-dir "$DATA_DIR" --out "$OUT_DIR/budget-2m" --quiet
    else
        skip budget_2m "no CIFAR-10 batches at $DATA_DIR (set DATA_DIR)"
    fi
    step bench_resnet50 120 "${CT[@]}" bench --backbones resnet50 --resolutions 224 --precisions bf16 \
        --memory-formats channels_last --modes train,infer --batch-size 256 --seconds 10 --device cuda \
        --json "$OUT_DIR/bench.json"
    if [ "$(gpus)" -ge 2 ]; then
        step ddp_nccl 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m cifar_transfer \
            train --recipe cnn-baseline --data-dir "$DATA_DIR" --out "$OUT_DIR/ddp" --quiet \
            --set phases.0.epochs=1 --set data.train_limit=2048 --set data.val_size=512
    else
        skip ddp_nccl "$(gpus) GPU: nccl needs one GPU per rank"
    fi
else
    for s in gpu_tests budget_2m bench_resnet50 ddp_nccl; do skip "$s" "no CUDA device"; done
fi

"$PY" - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"machine": json.loads((out / "machine.json").read_text()), "steps": {}}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, *why = line.split("\t")
    entry = {"status": "ok" if status == "0" else status if status == "skipped" else f"failed (exit {status})",
             "seconds": round(float(seconds), 1)}
    if why:
        entry["why"] = why[0]
    log = out / f"{name}.log"
    if entry["status"].startswith("failed") and log.is_file():
        entry["log_tail"] = log.read_text(errors="replace")[-1500:]
    report["steps"][name] = entry
meta = out / "budget-2m" / "model.json"
if meta.is_file():
    m = json.loads(meta.read_text())
    report["steps"]["budget_2m"].update(val_acc=m.get("val_acc"), backbone=m.get("backbone"),
                                        resolution=m.get("resolution"), precision=m.get("precision"))
bench = out / "bench.json"
if bench.is_file():
    report["steps"]["bench_resnet50"]["rows"] = json.loads(bench.read_text())
metrics = out / "ddp" / "metrics.jsonl"
if metrics.is_file():
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    report["steps"]["ddp_nccl"]["val_acc"] = rows[-1].get("val_acc") if rows else None
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PY
