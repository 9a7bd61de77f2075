"""Times diffusers on the built-in shapes-dit model the way `ditto generate` runs it:
16 samples (4 classes x 4 seeds) with CFG (batch 32), DDIM 20 steps, guidance 3.0, f32 on the
CPU, and prints seconds per denoising step. Compare with the s/step `ditto generate` prints.

    target/bench-venv/bin/python bench/pytorch_generate_builtin.py --threads 2
"""
import argparse, json, time

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

p = argparse.ArgumentParser()
p.add_argument("--model", default="assets/shapes-dit")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--guidance", type=float, default=3.0)
a = p.parse_args()
torch.set_num_threads(a.threads)

model = DiTTransformer2DModel.from_pretrained(f"{a.model}/transformer").float().eval()
sched = DDIMScheduler.from_pretrained(f"{a.model}/scheduler")
sched.set_timesteps(a.steps)
classes, seeds = 4, 4
latents = torch.cat([torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(s))
                     for c in range(classes) for s in range(seeds)])
labels = torch.tensor([c for c in range(classes) for _ in range(seeds)])
null = torch.full_like(labels, model.config.num_embeds_ada_norm)
with torch.inference_mode():
    step_times = []
    for t in sched.timesteps:
        t0 = time.perf_counter()
        x = torch.cat([latents, latents])
        out = model(x, timestep=t.expand(x.shape[0]), class_labels=torch.cat([null, labels])).sample
        eps = out[:, :3]
        e_null, e_cls = eps.chunk(2)
        eps = e_null + a.guidance * (e_cls - e_null)
        latents = sched.step(eps, t, latents).prev_sample
        step_times.append(time.perf_counter() - t0)
print(json.dumps({"s_per_step": sum(step_times) / len(step_times),
                  "median_s_per_step": sorted(step_times)[len(step_times) // 2]}))
