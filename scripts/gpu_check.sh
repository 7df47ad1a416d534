#!/usr/bin/env bash
# The checks that need a GPU, in one pass: the CUDA tests, the engine/workflow tests on CUDA (the bundle's
# device is CUDA when present), the default job on CUDA with bf16 autocast and without, its CUDA-trained
# checkpoint evaluated on CPU, and the training-step benchmarks (float32, bf16, channels-last) at the real
# datasets' sizes. Each step's log goes to OUT_DIR/<step>.log; the console gets a summary per step.
#
#   bash scripts/gpu_check.sh OUT_DIR            # PYTHON=python3 by default; WORKERS=4 pytest-xdist workers
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
workers=${WORKERS:-4}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch in $py sees no CUDA device; run this on a GPU machine" >&2
    exit 2
fi
nvidia-smi -L 2>/dev/null
"$py" -c "import torch, monai; print('torch', torch.__version__, '| monai', monai.__version__, '|',
    torch.cuda.get_device_name(0))"

failed=0
step() {  # step NAME TIMEOUT_S CMD...: run CMD with a time limit, log it, print rc, seconds and the log's end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n "$workers")

step cuda_tests 180 "$py" -m pytest -q -rA tests/test_cuda.py

job=(-m monai.bundle run --config_file configs/train.json --progress_bar False)
step job_bf16 150 "$py" "${job[@]}" --output_dir "$out/job_bf16"
# the bf16 job's best checkpoint, trained on CUDA, scored by the sweep on CPU
step job_bf16_eval_on_cpu 150 "$py" -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" \
    --output_dir "$out/job_bf16" --device "\$torch.device('cpu')" --mlflow_enabled False --progress_bar False
step job_fp32 150 "$py" "${job[@]}" --output_dir "$out/job_fp32" --amp False --mlflow_enabled False

bench=("$py" scripts/benchmark.py --device cuda --warmup 3 --iters 10)
derm=(--image-size 224 --batch-size 32)  # configs/datasets/derm7pt.json and odir.json
men=(--spatial-dims 3 --image-modalities 4 --image-size 96 --batch-size 4)  # configs/datasets/men.json
step bench_2d_fp32 90 "${bench[@]}" "${derm[@]}" --json "$out/bench_2d_fp32.json"
step bench_2d_bf16 90 "${bench[@]}" "${derm[@]}" --amp bf16 --json "$out/bench_2d_bf16.json"
step bench_2d_bf16_cl 90 "${bench[@]}" "${derm[@]}" --amp bf16 --channels-last --json "$out/bench_2d_bf16_cl.json"
step bench_2d_bf16_present 90 "${bench[@]}" "${derm[@]}" --amp bf16 --encode-present-only \
    --json "$out/bench_2d_bf16_present.json"
step bench_3d_fp32 90 "${bench[@]}" "${men[@]}" --json "$out/bench_3d_fp32.json"
step bench_3d_bf16 90 "${bench[@]}" "${men[@]}" --amp bf16 --json "$out/bench_3d_bf16.json"
# last: the longest step
step suite_on_cuda 240 "$py" -m pytest -q "${xdist[@]}" tests/test_engines.py tests/test_networks.py \
    tests/test_workflow.py tests/test_evaluate.py tests/test_validation.py tests/test_mlflow_server.py
exit $failed
