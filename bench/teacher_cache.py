"""What a worker's teacher cache saves (flows.cluster.worker.load_dataset_teacher, AMED_TEACHER_CACHE).

Every train and evaluate job (and the registration checks) asks its worker process for the dataset's teacher. Without
the cache each job loaded it again: the weights read, the network built and its content hashed (the teacher's
identity, which samplers and shard generation check). This times ``load_dataset_teacher(...).identity()`` called
``--jobs`` times in one fresh process, as one Ray worker running
that many jobs of a sweep would, with the cache off (``AMED_TEACHER_CACHE=0``, the behaviour before) and on (default),
for real diffusers pipeline folders with random weights (timing does not depend on them):

- ``cifar``: a DDPM pipeline with the CIFAR-10 UNet2DModel layout (35.7M parameters, float32, 143 MB);
- ``sd`` (``--sd``): a Stable Diffusion 1.x UNet2DConditionModel pipeline (860M parameters, float16, 1.72 GB;
  bench/plan_memory.py's folder).

    .venv/bin/python bench/teacher_cache.py [--jobs 4] [--sd] [--folder DIR (kept; made when missing)]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE_CIFAR = r"""
import json, sys, torch, diffusers
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from gpu import CIFAR_UNET  # bench/gpu.py's layout
torch.manual_seed(0)
unet = diffusers.UNet2DModel(**CIFAR_UNET)
unet.save_pretrained(root / "unet")
(root / "scheduler").mkdir(exist_ok=True)
(root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}))
(root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
    "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
"""

TIME = r"""
import json, os, sys, time
from flows.cluster.worker import load_dataset_teacher
from flows.config import DatasetConfig
root = sys.argv[1]
opts = {"prompt_embeds": root + "/prompts.safetensors"} if os.path.exists(root + "/prompts.safetensors") else {}
ds = DatasetConfig(name="t", teacher="diffusers:" + root, options=opts)
out = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    load_dataset_teacher(ds).identity()  # what a job does next: samplers and shards check the teacher's identity
    out.append(time.perf_counter() - t)
print("TIMES " + json.dumps(out))
"""


def times(folder: Path, jobs: int, cache: str) -> list[float]:
    env = {**os.environ, "AMED_TEACHER_CACHE": cache, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TIME, str(folder), str(jobs)], env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TIMES ")), None)
    if line is None:
        raise RuntimeError(f"timing failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[6:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--sd", action="store_true", help="also the SD 1.x folder (1.72 GB; bench/plan_memory.py makes it)")
    ap.add_argument("--folder", default=None, help="where the folders are kept (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="amed-teacher-cache-") as tmp:
        base = Path(args.folder or tmp)
        models = {"cifar": (base / "cifar", MAKE_CIFAR, [str(ROOT / "bench")])}
        if args.sd:
            sys.path.insert(0, str(ROOT / "bench"))
            from plan_memory import MAKE as MAKE_SD

            models["sd"] = (base / "sd", MAKE_SD, ["float16"])
        print("| model | cache | first job (s) | each later job (s) | jobs |\n|---|---|---:|---:|---:|")
        for name, (folder, make, extra) in models.items():
            if not (folder / "model_index.json").exists():
                folder.mkdir(parents=True, exist_ok=True)
                subprocess.run([sys.executable, "-c", make, str(folder), *extra], check=True, capture_output=True)
            for label, cache in (("off (before)", "0"), ("on (default)", "2")):
                t = times(folder, args.jobs, cache)
                later = sum(t[1:]) / max(1, len(t) - 1)
                print(f"| {name} | {label} | {t[0]:.2f} | {later:.3f} | {args.jobs} |", flush=True)


if __name__ == "__main__":
    main()
