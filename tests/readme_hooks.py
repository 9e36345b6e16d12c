"""Hooks of the README's annotated steps (tests/readme_blocks.py): ``setup=NAME`` puts in place the files the README
tells the user to bring; ``check=NAME`` checks what a step made beyond its exit status. Add a hook here when a new
README section needs one, and name it in the section's annotation."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path


# ---------------------------------------------------------------------------------------------------------------
# setup=...

def fid_files(ws, repo: Path) -> None:
    """What "Evaluation (FID)" tells the user to bring: their copy of the Inception weights (here random weights with
    the standard file's keys, saved as torch-fidelity's .pth state dict), an image dataset as a zip, and a folder of
    samples. Nothing is downloaded."""
    import numpy as np
    import torch
    from PIL import Image

    from fid_weights import random_state_dict

    torch.save(random_state_dict(0), repo / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(0)

    def png(k: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    with zipfile.ZipFile(repo / "my-dataset.zip", "w") as z:
        for k in range(12):
            z.writestr(f"img{k:03d}.png", png(k))
    (repo / "samples").mkdir(exist_ok=True)
    for k in range(12):
        (repo / "samples" / f"s{k:03d}.png").write_bytes(png(k))


SETUPS = {"fid-files": fid_files}


# ---------------------------------------------------------------------------------------------------------------
# check=...

def quickstart(ws, repo: Path, o) -> None:
    """`amed distill` (the quickstart): the results table, the champions and the commands that open the UIs."""
    out = o.stdout
    assert "margin" in out and "amed+ipndm" in out, out[-3000:]
    for nfe in (3, 5):
        assert f"models:/amed-digits-nfe{nfe}@champion" in out, out[-3000:]
    assert re.search(r"Prefect: PREFECT_HOME=\S+ PREFECT_UI_API_URL=http://127\.0\.0\.1:(\d+)/api \S*prefect server "
                     r"start --host 127\.0\.0\.1 --port \1", out), out[-2000:]
    assert (repo / "amed-runs" / "quickstart" / "mlflow.db").is_file()


def deploy(ws, repo: Path, o) -> None:
    """The "Deploying at scale" block: it ends with a champion fetched from the stack's MLflow, the watch output
    carries the results and champion URIs, and the flow named the registry and store it used."""
    mlflow_url = f"http://127.0.0.1:{ws.ports['AMED_MLFLOW_PORT']}"
    flat = " ".join(o.stdout.split())
    assert "Flow run finished successfully in 'Completed'" in flat, o.stdout[-4000:]
    assert f"registry: MLflow server {mlflow_url}" in flat, o.stdout[-4000:]
    assert f"store: store {repo / 'amed-runs' / 'stack' / 'store'}" in flat, o.stdout[-4000:]  # on disk
    assert "results of sweep deploy-smoke" in flat and "amed+ipndm" in flat, o.stdout[-4000:]
    assert f"champions in {mlflow_url}" in flat and "amed-digits-nfe3: models:/amed-digits-nfe3@champion" in flat
    # amed fetch printed what it fetched, from the server the stack started, next to the panel's best
    assert "model amed-digits-nfe3 version " in flat and "(fetched as @champion; aliases: " in flat, flat[-3000:]
    assert "NFE 3" in flat and "metric fd_exact " in flat and "panel best training-free " in flat, flat[-3000:]
    assert "teacher digits-gmm (adapter gmm, sha256 " in flat, flat[-3000:]
    fetched = repo / "amed-runs" / "champion-nfe3"
    names = sorted(p.name for p in fetched.iterdir())
    assert "sampler.json" in names, names
    import torch

    from amed_core.adapters import load_teacher
    from amed_core.families import load_sampler

    teacher = load_teacher("digits-gmm")
    x = load_sampler(fetched)(teacher, torch.randn(8, *teacher.shape, dtype=torch.float64)).x
    assert x.shape == (8, *teacher.shape) and torch.isfinite(x).all()
    o.pages = ui_pages(ws)  # while the stack still runs: tests/test_ui.py looks at them


def _api(url: str, body: dict):
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def ui_pages(ws) -> dict:
    """The UI pages a user opens after the deploy block, as rendered by headless Chromium ({} without Chromium): the
    Prefect UI's home, the flow run's Artifacts tab, each artifact's page, and MLflow's page of the champion's model.
    The ids come from the APIs, the pages from the UIs; tests/test_ui.py checks what they show."""
    from browser import chromium, dump_dom

    if chromium() is None:
        return {}
    prefect = f"http://127.0.0.1:{ws.ports['AMED_PREFECT_PORT']}"
    mlflow = f"http://127.0.0.1:{ws.ports['AMED_MLFLOW_PORT']}"
    [run] = _api(f"{prefect}/api/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    pages = {"flow_run_id": run["id"], "flow_run_name": run["name"], "home": dump_dom(f"{prefect}/"),
             "run": dump_dom(f"{prefect}/v2/runs/flow-run/{run['id']}?tab=Artifacts")}
    for a in _api(f"{prefect}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}):
        pages[f"artifact:{a['key']}"] = dump_dom(f"{prefect}/v2/artifacts/artifact/{a['id']}")
    pages["mlflow-model"] = dump_dom(f"{mlflow}/#/models/amed-digits-nfe3")
    return pages


def stack_down(ws, repo: Path, o) -> None:
    """`infra/local-stack.sh down` stopped everything `up` started."""
    from fixtures_readme import processes_naming

    assert "Stack down" in o.stdout, o.stdout
    assert not processes_naming(str(repo / "amed-runs" / "stack")), processes_naming(str(repo / "amed-runs" / "stack"))


def byom(ws, repo: Path, o) -> None:
    """Bring your own model: the user's network distilled; the AMED-Plugin fetched from the run's registry with
    `amed fetch` names the user's model, samples with it and refuses another model's weights."""
    import importlib.util
    import subprocess

    import pytest
    import torch

    from amed_core.amed import load_sampler

    m = re.search(r"models:/(amed-mine[-\w]*-nfe3)@champion", o.stdout)
    assert m, o.stdout[-3000:]
    results = json.loads((repo / "amed-runs" / "my-model" / "store" / "runs" / "my-model" / "results.json").read_text())
    assert {"amed", "amed+ipndm"} <= {r["solver"] for r in results["results"]}
    assert all(r["protocol"]["metric"] == "rmse" and r["value"] == r["value"] for r in results["results"])
    fetched = repo / "amed-runs" / "byom-plugin"
    env = {**ws.environ("main", activated=True), "PYTHONPATH": str(repo)}
    r = subprocess.run(["amed", "fetch", f"models:/{m.group(1)}@best-amed-ipndm", "--out", str(fetched),
                        "--tracking-uri", f"sqlite:///{repo / 'amed-runs' / 'my-model' / 'mlflow.db'}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher  score-mixer@v1 (adapter custom, sha256 " in r.stdout, r.stdout
    spec = importlib.util.spec_from_file_location("readme_mymodels", repo / "mymodels.py")
    mymodels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mymodels)
    teacher = mymodels.build(str(repo / "amed-runs" / "models" / "score-mixer.safetensors"))
    sampler = load_sampler(fetched)
    assert sampler.spec.teacher["name"] == "score-mixer@v1"
    assert (sampler.spec.schedule.sigma_min, sampler.spec.schedule.sigma_max) == (0.02, 80.0)
    with torch.no_grad():
        xs = sampler(teacher, torch.randn(16, 1, 8, 8, dtype=torch.float64)).x
    assert xs.shape == (16, 1, 8, 8) and torch.isfinite(xs).all()
    with pytest.raises(ValueError, match="trained for teacher 'score-mixer@v1'"):
        sampler(mymodels.build(), torch.randn(2, 1, 8, 8, dtype=torch.float64))  # other weights: refused


def fetch(ws, repo: Path, o) -> None:
    """`amed fetch` of the quickstart's NFE-5 champion, then `amed sample --predictor` on it."""
    assert "model    amed-digits-nfe5 version" in o.stdout and "panel    best training-free " in o.stdout, o.stdout
    assert "teacher  digits-gmm (adapter gmm, sha256 " in o.stdout, o.stdout
    assert (repo / "my-sampler" / "sampler.json").is_file()


def integrations_export(ws, repo: Path, o) -> None:
    """`amed export ... --to sigmas.json` of the quickstart's GITS candidate at NFE 5: its schedule, 6 points."""
    doc = json.loads((repo / "gits-nfe5.json").read_text())
    assert doc["family"] == "gits" and doc["solver"] == "ipndm" and len(doc["sigmas"]) == 6, doc


CHECKS = {"quickstart": quickstart, "deploy": deploy, "stack-down": stack_down, "byom": byom, "fetch": fetch,
          "integrations-export": integrations_export}
