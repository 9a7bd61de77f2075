#!/usr/bin/env bash
# Builds what bench/gpu/check.sh runs on the GPU machine (which has no Rust) into .device/
# (git-ignored; pass it to the device's `carry`): the stripped release `ditto`, the GPU
# parity test binary, and the diffusers wheel (the GPU image has torch but not diffusers).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device/whl
cargo build --release --quiet
cp target/release/ditto .device/ditto
test_bin=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
cp "$test_bin" .device/gpu-tests
strip .device/ditto .device/gpu-tests
if ! ls .device/whl/diffusers-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d .device/whl "diffusers==0.42.1"
fi
du -sh .device/*
