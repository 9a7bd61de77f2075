#!/usr/bin/env bash
# The CUDA backend's GPU checks, in one run on a machine with one NVIDIA GPU (H100/H200),
# from the repository root, after bench/gpu/build.sh made .device/ here:
#
#   bench/gpu/check.sh OUTDIR
#
# 1. parity: the gpu test binary (every fixture model and pipeline on the GPU vs the CPU
#    backend, f32 / bf16 / f16; CUDA graph replay; four ranks of a USP program on the one
#    GPU), and a 2-process `ditto launch` run on the GPU against the CPU;
# 2. forward benchmarks, ditto vs diffusers eager vs torch.compile on the same GPU, same
#    random weights (the checkpoint folder ditto writes), same inputs, bf16:
#    PixArt-Σ at 1024 px (4096 tokens, CFG batch 2, 300 text tokens) and Flux-dev's widths
#    at 1024 px (4096 + 512 tokens, batch 1) with FLUX_DOUBLE + FLUX_SINGLE blocks (default
#    2 + 4; the full 19 + 38 with FLUX_DOUBLE=19 FLUX_SINGLE=38 needs ~48 GB of disk);
# 3. the kernel table (`ditto bench kernels`: each kernel's GB/s against the copy
#    bandwidth, attention TFLOP/s) and torch SDPA at the same attention shapes.
#
# Every section has its own time limit and log; a failing one does not stop the others.
# Results: OUTDIR/{parity,pixart,flux,kernels,sdpa}.txt and *.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/gpu-check}
mkdir -p "$OUT"
BIN=.device/ditto
ITERS=${ITERS:-10}
FLUX_DOUBLE=${FLUX_DOUBLE:-2}
FLUX_SINGLE=${FLUX_SINGLE:-4}
export PYTHONUNBUFFERED=1
source bench/gpu/env.sh >"$OUT/env.txt"
cat "$OUT/env.txt"
if ! python3 -c 'import diffusers' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/env.txt"

section() { echo; echo "== $1 ($(date +%T))"; }

section parity
DITTO_REQUIRE_GPU=1 timeout 240 .device/gpu-tests --nocapture --test-threads 1 2>&1 | tee "$OUT/parity.txt"

section "multi-process: ditto launch, 2 ranks (Ulysses 2) on the GPU vs the CPU"
fx=tests/fixtures/pixart
$BIN forward --model $fx --inputs $fx/io.safetensors --out "$OUT/mp-cpu.safetensors"
timeout 180 $BIN launch --nproc-per-node 2 -- forward --device cuda --dtype f32 \
    --ulysses-degree 2 --model $fx --inputs $fx/io.safetensors --out "$OUT/mp-cuda.safetensors" \
    && python3 bench/gpu/compare.py "$OUT/mp-cuda.safetensors" "$OUT/mp-cpu.safetensors" 1e-4 \
    2>&1 | tee "$OUT/multiprocess.txt"

# One model: ditto, then diffusers eager, then torch.compile, on ditto's checkpoint.
bench_model() {
    local tag=$1; shift
    local dir=/tmp/ditto-bench-$tag
    section "$tag: ditto"
    timeout 300 $BIN bench forward --device cuda --dtype bf16 --dir "$dir" --warmup 2 \
        --iters "$ITERS" --out "$OUT/$tag-ditto.safetensors" --json "$OUT/$tag-ditto.json" "$@" \
        2>&1 | tee "$OUT/$tag.txt"
    for mode in eager compile; do
        section "$tag: diffusers $mode"
        local flag=""; [ $mode = compile ] && flag=--compile
        timeout 400 python3 bench/pytorch_forward.py --dir "$dir" --threads 16 --device cuda \
            --dtype bfloat16 $flag --warmup 2 --iters "$ITERS" \
            --compare "$OUT/$tag-ditto.safetensors" --json "$OUT/$tag-torch-$mode.json" \
            2>&1 | tail -25 | tee -a "$OUT/$tag.txt"
    done
}
bench_model pixart --config pixart-sigma-1024 --batch 2 --text-len 300
bench_model flux --config flux-dev --batch 1 --latent-size 64 --text-len 512 \
    --set num_layers=$FLUX_DOUBLE --set num_single_layers=$FLUX_SINGLE

section kernels
timeout 240 $BIN bench kernels --device cuda --dtype bf16 --config pixart-sigma-1024 \
    --dir /tmp/ditto-bench-pixart --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
section sdpa
timeout 120 python3 bench/gpu/sdpa.py bf16 "$OUT/sdpa.json" 2>&1 | tee "$OUT/sdpa.txt"
section done
