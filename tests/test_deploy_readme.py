"""The README's "Deploying at scale" block, run as written: taken from README.md and run by bash in a copy of the
checkout (`.venv` linked in) against real servers on 127.0.0.1 (infra/local-stack.sh: PostgreSQL, moto S3, Prefect,
MLflow, pool + worker); it must end with a champion fetched from the MLflow server the stack started, the watch
output must carry the results table and champion URIs, and the flow must name the registry it used. Ports and the
stack folder come from the environment (the script's AMED_* settings), never from edits to the block."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_local_stack import _clean_env, _free_port, _pg_installable  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]


def readme_block(section: str = "## Deploying at scale") -> str:
    """The first ```bash block after the heading ``section`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(section + "\n")
    m = re.search(r"^```bash\n(.*?)^```$", text[start:], re.S | re.M)
    assert m, f"no bash block under {section!r}"
    return m.group(1)


def test_block_uses_the_stack_and_a_small_sweep():
    block = readme_block()
    for needed in ("infra/local-stack.sh up --worker", 'eval "$(infra/local-stack.sh env)"',
                   "prefect --no-prompt deploy --prefect-file infra/prefect.yaml --name local",
                   "prefect deployment run 'distill/local'", "--watch", "configs/deploy-smoke.yaml",
                   "amed fetch models:/amed-digits-nfe3@champion", "infra/local-stack.sh down"):
        assert needed in block, needed
    assert "--tracking-uri" not in block  # the tracking URI comes from the stack's env
    assert (ROOT / "configs" / "deploy-smoke.yaml").is_file()


def _copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (what a fresh clone of it holds)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def test_readme_deploy_block_end_to_end():
    if not _pg_installable():
        pytest.skip("PostgreSQL server binaries are missing and cannot be installed here")
    block = readme_block()
    folder = Path(tempfile.mkdtemp(prefix="amed-readme-"))
    folder.chmod(0o711)  # PostgreSQL runs as `postgres` when we are root
    repo = folder / "amed-distill"
    repo.mkdir()
    _copy_checkout(repo)
    env = _clean_env()
    env.update(AMED_STACK_DIR=str(folder / "stack"), AMED_PREFECT_PORT=str(_free_port()),
               AMED_MLFLOW_PORT=str(_free_port()), AMED_PG_PORT=str(_free_port()), AMED_S3_PORT=str(_free_port()),
               AMED_MLFLOW_WORKERS="1", AMED_STACK_TIMEOUT="150", COLUMNS="200")
    mlflow_url = f"http://127.0.0.1:{env['AMED_MLFLOW_PORT']}"
    t0 = time.time()
    try:
        # the block as written; only a trace with a timestamp per command is switched on first (each step's time)
        trace = 'PS4="+ @@step \\$(date +%s.%N) "; set -x\n'
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", trace + block], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=540)
    finally:
        subprocess.run(["bash", str(repo / "infra" / "local-stack.sh"), "down"], env=env, cwd=repo,
                       capture_output=True, timeout=120)
    wall = time.time() - t0
    out = r.stdout
    logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((folder / "stack" / "logs").glob("*.log")))
    detail = f"rc={r.returncode}\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}{logs}"
    try:
        assert r.returncode == 0, detail
        # each step's time (from bash -x's timestamps), printed for README's estimates
        steps = [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^\+ @@step (\d+\.\d+) (.*)$", r.stderr, re.M)]
        top = steps
        times = {c[:70]: round(b[0] - a[0], 1) for a, b, c in
                 ((top[i], top[i + 1] if i + 1 < len(top) else (t0 + wall, ""), top[i][1]) for i in range(len(top)))}
        print(json.dumps({"wall_s": round(wall, 1), "steps_s": times}, indent=1))

        flat = " ".join(out.split())
        assert "Flow run finished successfully in 'Completed'" in flat, detail
        # the flow named the registry and store it used, and ended with the results and the champion URIs
        assert f"registry: MLflow server {mlflow_url}" in flat, detail
        assert re.search(r"store: (store )?s3://amed-distill/store", flat), detail
        assert "results of sweep deploy-smoke" in flat and "amed+ipndm" in flat, detail
        assert f"champions in {mlflow_url}" in flat and "amed-digits-nfe3: models:/amed-digits-nfe3@champion" in flat, detail
        # amed fetch printed what it fetched, from the server the stack started
        assert "model amed-digits-nfe3 version " in flat and "(fetched as @champion; aliases: " in flat, detail
        assert "method amed" in flat and "NFE 3" in flat and "metric fd_exact " in flat, detail
        assert "teacher digits-gmm (adapter gmm, sha256 " in flat, detail
        fetched = repo / "amed-runs" / "champion-nfe3"
        assert sorted(p.name for p in fetched.iterdir()) == ["predictor.safetensors", "sampler.json"]
        import torch

        from amed_core.adapters import load_teacher
        from amed_core.amed import load_sampler

        teacher = load_teacher("digits-gmm")
        x = load_sampler(fetched)(teacher, torch.randn(8, *teacher.shape, dtype=torch.float64)).x
        assert x.shape == (8, *teacher.shape) and torch.isfinite(x).all()
        # down stopped everything it started
        st = subprocess.run(["bash", str(repo / "infra" / "local-stack.sh"), "status"], env=env, cwd=repo,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode != 0, st.stdout
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_sweep_parameter_is_typed_and_described():
    """The deployment's `sweep` parameter in the Prefect UI: a path or a SweepConfig object, with a description."""
    from flows.distill import distill

    p = distill.parameters.model_dump()["properties"]["sweep"]
    kinds = [a.get("type") or a.get("$ref") for a in p["anyOf"]]
    assert "string" in kinds and any("SweepConfig" in str(k) for k in kinds)
    assert "path of a YAML file" in p["description"] and "MLFLOW_TRACKING_URI" in p["description"]
    assert p["default"] == "configs/quickstart.yaml"
