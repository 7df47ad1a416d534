#!/usr/bin/env bash
# The checks that need a GPU, in one call of a few minutes, summarised in one JSON (OUT_DIR/gpu_check.json):
#   cuda_tests   tests/test_cuda.py (bf16 autocast, CPU/CUDA agreement, cross-device weights)
#   bench_step   scripts/benchmark.py: training steps of CMML stage 1 / 2 and zero-fill at Derm7pt size, bf16
#   bench_e2e    scripts/benchmark.py --e2e: the data pipeline against model-only, inference latency, memory
#   ddp_smoke    torchrun (one process per GPU, at most 2) of train.json + multi_gpu_train.json: NCCL DDP (SyncBatchNorm), both
#                stages, tiny synthetic data
# --full adds the longer checks: the default job with and without bf16, its CUDA-trained checkpoint swept on
# CPU, the 3D / channels-last benchmarks and the engine/workflow tests on CUDA.
# --cpu runs the same script without a GPU (CI, a laptop): no CUDA tests, CPU benchmarks in short form, the
# DDP smoke test with gloo; it checks that the script and its JSON work, not the GPU.
#
#   bash scripts/gpu_check.sh [--cpu] [--full] OUT_DIR    # PYTHON=python3 by default; WORKERS=4 pytest-xdist workers
#
# Each step's log goes to OUT_DIR/<step>.log; the console gets a summary per step. Exit status 0 when every
# step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
full=0
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) cpu=1; shift ;;
        --full) full=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
out=${1:?usage: scripts/gpu_check.sh [--cpu] [--full] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
workers=${WORKERS:-4}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ "$cpu" -eq 0 ]; then
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: torch in $py sees no CUDA device; run this on a GPU machine (or pass --cpu)" >&2
        exit 2
    fi
    nvidia-smi -L 2>/dev/null
    device=cuda
    nproc=$("$py" -c "import torch; print(min(2, torch.cuda.device_count()))")
else
    device=cpu
    nproc=2
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
"$py" -c "import torch, monai; print('torch', torch.__version__, '| monai', monai.__version__, '|',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

steps_tsv="$out/steps.tsv"
: >"$steps_tsv"
failed=0
step() {  # step NAME TIMEOUT_S CMD...: run CMD with a time limit, log it, print rc, seconds and the log's end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$out/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$steps_tsv"
    [ "$rc" -eq 0 ] || failed=1
}

bench=("$py" scripts/benchmark.py --device "$device")
if [ "$cpu" -eq 0 ]; then
    step cuda_tests 180 "$py" -m pytest -q -rA tests/test_cuda.py
    derm=(--image-size 224 --batch-size 32)  # configs/datasets/derm7pt.json and odir.json
    step bench_step 120 "${bench[@]}" "${derm[@]}" --amp bf16 --warmup 3 --iters 10 --json "$out/bench_step.json"
    step bench_e2e 240 "${bench[@]}" --e2e --amp bf16 --image-size 224 --volume-size 96 --batch-size 16 \
        --e2e-cases 96 --workers 4 --json "$out/bench_e2e.json"
else
    small=(--image-encoder resnet10 --feature-dim 32 --image-size 32 --batch-size 4 --threads 1)
    step bench_step 240 "${bench[@]}" "${small[@]}" --warmup 1 --iters 2 --json "$out/bench_step.json"
    step bench_e2e 300 "${bench[@]}" --e2e "${small[@]}" --volume-size 24 --e2e-cases 24 --workers 2 \
        --json "$out/bench_e2e.json"
fi

# DDP: the multi-GPU overlay on tiny synthetic data (NCCL on CUDA, gloo with --cpu), both stages
ddp_out="$out/ddp_smoke"
syncbn=()
[ "$cpu" -eq 0 ] && syncbn=(--sync_batchnorm true)  # SyncBatchNorm needs CUDA
step ddp_smoke 300 "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m monai.bundle run \
    --config_file "['configs/train.json','configs/multi_gpu_train.json']" --bundle_root . \
    --dataset_dir "$ddp_out/data" --synthetic_cases 30 --output_dir "$ddp_out" --shared_dir "$ddp_out/shared" \
    --spatial_size "[32,32]" --image_encoder resnet10 --feature_dim 16 --batch_size 4 \
    --stage1_epochs 1 --stage2_epochs 1 --missing_rates "[0.0,0.5]" --progress_bar False --mlflow_enabled False \
    "${syncbn[@]}"
# the smoke test passes only if rank 0 published the served weights
[ -f "$ddp_out/models/model.pt" ] || { echo "== ddp_smoke: no $ddp_out/models/model.pt"; failed=1; }

if [ "$full" -eq 1 ] && [ "$cpu" -eq 0 ]; then
    xdist=()
    "$py" -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
    job=(-m monai.bundle run --config_file configs/train.json --progress_bar False)
    step job_bf16 150 "$py" "${job[@]}" --output_dir "$out/job_bf16"
    # the bf16 job's best checkpoint, trained on CUDA, scored by the sweep on CPU
    step job_bf16_eval_on_cpu 150 "$py" -m monai.bundle run \
        --config_file "['configs/train.json','configs/evaluate.json']" --output_dir "$out/job_bf16" \
        --device "\$torch.device('cpu')" --mlflow_enabled False --progress_bar False
    step job_fp32 150 "$py" "${job[@]}" --output_dir "$out/job_fp32" --amp False --mlflow_enabled False
    long=("${bench[@]}" --warmup 3 --iters 10)
    men=(--spatial-dims 3 --image-modalities 4 --image-size 96 --batch-size 4)  # configs/datasets/men.json
    step bench_2d_fp32 90 "${long[@]}" "${derm[@]}" --json "$out/bench_2d_fp32.json"
    step bench_2d_bf16_cl 90 "${long[@]}" "${derm[@]}" --amp bf16 --channels-last --json "$out/bench_2d_bf16_cl.json"
    step bench_2d_bf16_present 90 "${long[@]}" "${derm[@]}" --amp bf16 --encode-present-only \
        --json "$out/bench_2d_bf16_present.json"
    step bench_3d_fp32 90 "${long[@]}" "${men[@]}" --json "$out/bench_3d_fp32.json"
    step bench_3d_bf16 90 "${long[@]}" "${men[@]}" --amp bf16 --json "$out/bench_3d_bf16.json"
    step suite_on_cuda 240 "$py" -m pytest -q "${xdist[@]}" tests/test_engines.py tests/test_networks.py \
        tests/test_workflow.py tests/test_evaluate.py tests/test_validation.py tests/test_mlflow_server.py \
        tests/test_distributed.py
fi

# one JSON: every step's status and time, the benchmark reports, the environment
"$py" - "$out" "$device" "$failed" <<'EOF'
import glob, json, os, platform, sys
import torch
out, device, failed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
steps = {}
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, rc, seconds = line.rstrip("\n").split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "log": os.path.join(out, name + ".log")}
benchmarks = {}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    with open(path) as f:
        benchmarks[os.path.basename(path)[:-5]] = json.load(f)
report = {
    "ok": not failed and all(s["rc"] == 0 for s in steps.values()),
    "device": device,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "python": platform.python_version(),
    "steps": steps,
    "ddp_smoke_served_model": os.path.isfile(os.path.join(out, "ddp_smoke", "models", "model.pt")),
    "benchmarks": benchmarks,
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2)
print(f"== {os.path.join(out, 'gpu_check.json')}: ok={report['ok']}")
EOF
exit $failed
