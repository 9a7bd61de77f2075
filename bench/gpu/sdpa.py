#!/usr/bin/env python3
"""torch's scaled_dot_product_attention at the shapes of `ditto bench kernels`' attention
table (head dims 64/72/128, 4096 and 16384 tokens, 24 heads, batch 1, bf16), timed with CUDA
events: the reference for ditto's flash-attention TFLOP/s, measured in the same run."""
import json
import sys

import torch
import torch.nn.functional as F


def main() -> int:
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
    rows = []
    for hd in (64, 72, 128):
        for seq in (4096, 16384):
            q, k, v = (torch.randn(1, 24, seq, hd, device="cuda", dtype=dtype) for _ in range(3))
            F.scaled_dot_product_attention(q, k, v)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            start.record()
            for _ in range(reps):
                F.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / reps
            flops = 4.0 * 24 * hd * seq * seq
            rows.append({"head_dim": hd, "seq": seq, "heads": 24, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12})
            print(f"sdpa hd {hd:<4} seq {seq:>6}: {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s")
    json.dump(rows, sys.stdout if len(sys.argv) < 3 else open(sys.argv[2], "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
