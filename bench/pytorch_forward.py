#!/usr/bin/env python3
"""Times diffusers' forward pass on the checkpoint folder written by ditto's bench_forward.

The folder holds config.json + diffusion_pytorch_model.safetensors (ditto's seeded random
weights) and io.safetensors (the inputs as `input.<forward argument>`), so both engines run
the very same model on the very same inputs. Prints one JSON object (median/min seconds,
and the max relative error against ditto's output when --compare is given) and writes the
output as `output` into --out.

    python bench/pytorch_forward.py --dir target/bench/pixart-sigma-256 --threads 2 \
        --warmup 1 --iters 3 --out target/bench/torch_out.safetensors \
        --compare target/bench/ditto_out.safetensors

On a GPU: `--device cuda --dtype bfloat16` (eager) and `--compile` (torch.compile of the
model, compiled during the warm-up runs), timed with CUDA synchronization around each run.
The model class is the config's `_class_name` (PixArt, DiT, SD3, Flux transformers).
"""

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="checkpoint folder written by bench_forward")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", help="write diffusers' output here (tensor `output`)")
    ap.add_argument("--compare", help="safetensors with ditto's output (tensor `output`)")
    ap.add_argument("--json", help="also write the result object here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()

    # Thread pools are sized when torch starts: set the OpenMP/MKL limits before importing
    # it, and set_num_threads for the intra-op pool. One inter-op thread: the forward is a
    # chain of ops, and ditto runs them one after another too.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    import diffusers
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (only possible once per process)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    with open(os.path.join(args.dir, "config.json")) as f:
        class_name = json.load(f)["_class_name"]
    model_class = getattr(diffusers, class_name)
    t0 = time.perf_counter()
    model, info = model_class.from_pretrained(
        args.dir, torch_dtype=dtype, output_loading_info=True
    )
    model = model.to(device).eval()
    load_s = time.perf_counter() - t0
    # Any key diffusers had to initialize itself would make the comparison meaningless.
    bad = {k: v for k, v in info.items() if v}
    if bad:
        print(f"error: checkpoint does not match diffusers' model: {bad}", file=sys.stderr)
        return 1

    io = load_file(os.path.join(args.dir, "io.safetensors"))
    inputs = {k[len("input."):]: v for k, v in io.items() if k.startswith("input.")}
    kwargs = {}
    for name, t in inputs.items():
        if name == "class_labels":
            t = t.long()
        elif name not in ("timestep", "img_ids", "txt_ids", "guidance"):
            t = t.to(dtype)
        kwargs[name] = t.to(device)
    if class_name.startswith("PixArt"):
        # What PixArtSigmaPipeline passes when use_additional_conditions is false.
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    kwargs["return_dict"] = False

    run = torch.compile(model) if args.compile else model

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run(**kwargs)
        sync()
        warmup_s = time.perf_counter() - t0
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = run(**kwargs)[0]
            sync()
            times.append(time.perf_counter() - t0)

    out = out.float().cpu().contiguous()
    result = {
        "engine": "diffusers" + (" + torch.compile" if args.compile else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "warmup_s": warmup_s,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "iters": args.iters,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "load_s": load_s,
        "output_shape": list(out.shape),
    }
    if args.out:
        save_file({"output": out}, args.out)
    if args.compare:
        # Same measure as ditto's HostTensor::max_rel_err and the fixtures:
        # max|a - b| / max|reference|, with diffusers as the reference.
        other = load_file(args.compare)["output"]
        if list(other.shape) != list(out.shape):
            result["max_rel_err"] = float("inf")
        else:
            diff = (other.double() - out.double()).abs().max().item()
            result["max_rel_err"] = diff / out.double().abs().max().item()
        result["max_abs_ref"] = out.abs().max().item()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
