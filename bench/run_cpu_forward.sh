#!/usr/bin/env bash
# ditto vs diffusers (PyTorch CPU): one forward pass of PixArt-Σ XL/2 at 256×256
# (28 blocks, 16 heads × 72, 256 image tokens, 300 text tokens, batch 2) with the same
# seeded random weights, the same inputs and the same thread count, timed in one run.
#
#   bench/run_cpu_forward.sh            # 2 threads; 3 rounds of 1 warmup + 3 timed runs each
#   THREADS=4 ROUNDS=1 ITERS=10 bench/run_cpu_forward.sh
#
# Steps: build ditto (release) -> Python venv under target/bench-venv with torch +
# diffusers + safetensors + accelerate from PyPI (first run only) -> ditto writes the random
# checkpoint + inputs and times itself -> diffusers loads that folder and times itself,
# comparing its output with ditto's -> a summary table.
#
# Environment: THREADS (2), ROUNDS (3), WARMUP (1), ITERS (3), CONFIG (pixart-sigma, or a config.json),
# SEED (0), BENCH_DIR (target/bench), PYTHON (python3, to create the venv).
set -euo pipefail

cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-1}
ITERS=${ITERS:-3}
ROUNDS=${ROUNDS:-3}
CONFIG=${CONFIG:-pixart-sigma}
SEED=${SEED:-0}
BENCH_DIR=${BENCH_DIR:-target/bench}
PYTHON=${PYTHON:-python3}
VENV=target/bench-venv
CKPT="$BENCH_DIR/$(basename "${CONFIG%.json}")-ckpt"
mkdir -p "$BENCH_DIR"

echo "== building ditto (release)"
cargo build --release --quiet

# torch's default PyPI wheel is the CUDA build (it pulls ~3 GB of nvidia-* wheels) but runs
# on the CPU just the same. PyPI has no official CPU-only build under another name (there
# is no `torch-cpu`), and PyTorch's own CPU-only index is not reachable from here. `accelerate` lets diffusers load the
# checkpoint without first initializing a second, random copy of it.
if ! "$VENV/bin/python" -c "import torch, diffusers, safetensors, accelerate" 2>/dev/null; then
    echo "== creating $VENV (torch, diffusers, safetensors, accelerate from PyPI)"
    start=$(date +%s)
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet torch diffusers safetensors accelerate
    echo "   done in $(($(date +%s) - start)) s ($(du -sh "$VENV" | cut -f1))"
fi

# Thread limits for both engines: rayon gets --threads, torch set_num_threads + OpenMP/MKL.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS

# The engines run in alternating rounds (ditto, torch, ditto, torch, ...), each round its own
# process with its own warmup, so a load change on a shared machine hits both sides alike.
rm -f "$BENCH_DIR"/ditto.*.json "$BENCH_DIR"/torch.*.json
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round/$ROUNDS: ditto ($CONFIG, $THREADS threads, $WARMUP warmup + $ITERS timed runs)"
    target/release/ditto bench forward \
        --config "$CONFIG" --threads "$THREADS" --warmup "$WARMUP" --iters "$ITERS" \
        --seed "$SEED" --dir "$CKPT" \
        --out "$BENCH_DIR/ditto_out.safetensors" --json "$BENCH_DIR/ditto.$round.json"

    echo "== round $round/$ROUNDS: diffusers (PyTorch CPU) on the same checkpoint and inputs"
    "$VENV/bin/python" bench/pytorch_forward.py --dir "$CKPT" --threads "$THREADS" \
        --warmup "$WARMUP" --iters "$ITERS" \
        --out "$BENCH_DIR/torch_out.safetensors" --compare "$BENCH_DIR/ditto_out.safetensors" \
        --json "$BENCH_DIR/torch.$round.json" > /dev/null
done

"$VENV/bin/python" - "$BENCH_DIR" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
ds = [json.load(open(f"{out}/ditto.{r}.json")) for r in range(1, rounds + 1)]
ts = [json.load(open(f"{out}/torch.{r}.json")) for r in range(1, rounds + 1)]
d, t = ds[-1], ts[-1]
dt = [x for r in ds for x in r["times_s"]]
tt = [x for r in ts for x in r["times_s"]]
dmed, tmed = statistics.median(dt), statistics.median(tt)
print()
print(f"{d['class_name']}: batch {d['batch']}, latent {d['height']}x{d['width']} "
      f"({d['image_tokens']} tokens), text {d['text_len']}, {d['parameters'] / 1e6:.0f}M params, "
      f"{d['flops'] / 1e9:.1f} GFLOP/forward")
print(f"threads: ditto {d['threads']}, torch {t['threads']} (torch {t['torch']}, diffusers {t['diffusers']}); "
      f"{rounds} alternating rounds x {len(d['times_s'])} timed runs")
print(f"ditto runs s: {' '.join(f'{x:.2f}' for x in dt)}")
print(f"torch runs s: {' '.join(f'{x:.2f}' for x in tt)}")
print()
print(f"| {'':24} | {'ditto':>9} | {'torch':>9} |")
print(f"|{'-' * 26}|{'-' * 11}|{'-' * 11}|")
print(f"| {'median s':24} | {dmed:9.3f} | {tmed:9.3f} |")
print(f"| {'min s':24} | {min(dt):9.3f} | {min(tt):9.3f} |")
print(f"| {'GFLOP/s (median)':24} | {d['flops'] / dmed / 1e9:9.1f} | {d['flops'] / tmed / 1e9:9.1f} |")
print()
print(f"ratio ditto/torch (median): {dmed / tmed:.3f}x   (min: {min(dt) / min(tt):.3f}x; goal <= 1.0x)")
err = max(r["max_rel_err"] for r in ts)
print(f"max rel err (max|ditto - torch| / max|torch|): {err:.3e}")
print()
print("ditto profile (per forward, mean over all timed runs):")
print(f"  {'step kind':<20} {'steps':>6} {'seconds':>9} {'%':>7} {'GFLOP/s':>9}")
kinds = {}
for r in ds:
    for p in r["profile"]:
        k = kinds.setdefault(p["kind"], {"steps": p["steps"], "seconds": 0.0, "flops": 0.0})
        k["seconds"] += p["seconds"] / rounds
        if p["gflops"]:
            k["flops"] = p["gflops"] * p["seconds"] * 1e9
total = sum(k["seconds"] for k in kinds.values())
for name, k in sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"]):
    rate = f"{k['flops'] / k['seconds'] / 1e9:.1f}" if k["flops"] else ""
    pct = 100 * k["seconds"] / total
    print(f"  {name:<20} {k['steps']:>6} {k['seconds']:>9.4f} {pct:>6.1f}% {rate:>9}")
if not err <= 1e-4:
    print("\nERROR: outputs disagree (> 1e-4): the timings compare different computations")
    sys.exit(1)
EOF
