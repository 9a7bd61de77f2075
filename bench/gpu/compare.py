#!/usr/bin/env python3
"""max|a - b| / max|b| of tensor `output` in two safetensors files (b the reference);
exits 1 above the tolerance (third argument, default 1e-4)."""
import sys

from safetensors.numpy import load_file

a, b = (load_file(p)["output"].astype("float64") for p in sys.argv[1:3])
tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
err = abs(a - b).max() / abs(b).max() if a.shape == b.shape else float("inf")
print(f"{sys.argv[1]} vs {sys.argv[2]}: max rel err {err:.3e} (tolerance {tol:g})")
sys.exit(0 if err <= tol else 1)
