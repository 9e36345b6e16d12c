"""Planning's cost in the flow process for a large teacher (issue 13, item 7): peak memory and plan time of
``plan_sweep`` on a full-size Stable Diffusion 1.x UNet (UNet2DConditionModel, 860M parameters, randomly initialised,
``save_pretrained`` into a pipeline folder with a DDPM scheduler and prompt embeddings), before (the teacher loaded in
the planning process, as ``plan_dataset`` did with ``load_teacher``) and after (``flows.cluster.probe``: a child
process reads it). Each measurement runs in a fresh interpreter; peak memory = its ru_maxrss (the probe child's
separately).

    .venv/bin/python bench/plan_memory.py [--folder DIR (kept; made when missing)] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = r"""
import json, sys, torch, diffusers
from pathlib import Path
from safetensors.torch import save_file
root, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
torch.manual_seed(0)
unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x layout (defaults)
print("parameters", sum(p.numel() for p in unet.parameters()))
unet.to(dtype).save_pretrained(root / "unet")
(root / "scheduler").mkdir(exist_ok=True)
(root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}))
(root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
save_file({"prompt_embeds": torch.randn(2, 77, 768), "negative_prompt_embeds": torch.zeros(1, 77, 768)},
          str(root / "prompts.safetensors"))
"""

MEASURE = r"""
import json, resource, sys, time
mode, root = sys.argv[1], sys.argv[2]
from flows.config import load_sweep
import flows.plan
cfg = load_sweep({"name": "planmem", "store_url": sys.argv[3],
    "datasets": [{"name": "sd", "teacher": f"diffusers:{root}", "options": {"prompt_embeds": f"{root}/prompts.safetensors"}}],
    "solvers": ["amed"], "nfes": [4], "sampler": {"schedule_type": "discrete"},
    "teacher": {"num_trajectories": 64, "shard_size": 64}, "train": {"batch_size": 32},
    "evaluation": {"metric": "rmse", "num_samples": 64}, "panel": {"entries": [{"solver": "ipndm"}]}, "register_models": False})
if mode == "before":   # the previous plan_dataset: load_teacher in this process
    import flows.cluster.probe as probe
    from amed_core.denoisers import load_teacher
    probe.probe_teacher = lambda d, **k: load_teacher(d.teacher, **d.load_kwargs())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
plan = flows.plan.plan_sweep(cfg)
dt = time.perf_counter() - t0
print("PLANMEM " + json.dumps({"mode": mode, "plan_seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "rss_before_plan_mb": base / 1024, "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
      "candidates": len(plan.candidates)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None)
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="amed-planmem-")
    folder = Path(args.folder or Path(tmp.name) / "sd")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "unet").is_dir():
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", MAKE, str(folder), args.dtype], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:])
            return 1
        print(r.stdout.strip(), f"(made in {time.perf_counter() - t0:.0f}s)")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"pipeline folder {folder}: {size / 1e9:.2f} GB")
    for mode in ("after", "before", "after"):  # after twice: the first pays the page cache
        r = subprocess.run([sys.executable, "-c", MEASURE, mode, str(folder), str(Path(tmp.name) / "store")],
                           capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), **__import__("os").environ})
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PLANMEM ")), None)
        if line is None:
            print(r.stderr[-3000:])
            return 1
        rec = json.loads(line[8:])
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
