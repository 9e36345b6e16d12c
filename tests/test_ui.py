"""The UIs are part of the product (issue 19): the Prefect UI was blank because its pages called Prefect's default API
(127.0.0.1:4200) instead of the server's own, both on the local stack and with the command `amed distill` prints.

- The command `amed distill` prints (the README's quickstart, run by tests/fixtures_readme.py) serves a UI whose API
  URL is its own server's, whatever the shell's PREFECT_API_URL says. (The stack's server: tests/test_local_stack.py.)
- After the README's "Deploying at scale" block, headless Chromium (Debian's `chromium`, where installed; `.ci/run`
  installs it) renders the flow run's Artifacts tab, the results table and the champions' page, and MLflow's model
  page: the run, the table's text, the sample grids and the champion URI are on the rendered pages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from browser import chromium, images, visible_text
from fixtures_readme import free_port

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _passed(o):
    if o.status == "skipped":
        pytest.skip(o.detail)
    assert o.status == "passed", f"the README step README.md:{o.block.line} failed first: {o.detail[-3000:]}"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


@pytest.mark.timeout(0)  # the README runner bounds the steps it runs first
def test_prefect_ui_command_printed_by_amed_distill_serves_its_own_api(readme, tmp_path):
    o = readme.run_through(readme.block(check="quickstart"))
    _passed(o)
    m = re.search(r"  Prefect: (.*prefect server start --host 127\.0\.0\.1 --port (\d+))   -> http://127\.0\.0\.1:\2",
                  o.stdout)
    assert m, o.stdout[-2000:]
    printed, port = m.group(1), m.group(2)
    # as printed, on a port free now (the printed one was free when printed; both mentions change together), in a
    # shell whose own Prefect settings point elsewhere (a user's Prefect on 4200, here a dead port)
    mine = str(free_port())
    command = printed.replace(f":{port}/api", f":{mine}/api").replace(f"--port {port}", f"--port {mine}")
    env = {**readme.environ("main", activated=False), "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=readme.clone("main"), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                if _get(f"http://127.0.0.1:{mine}/api/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        code, body = _get(f"http://127.0.0.1:{mine}/ui-settings")
        assert code == 200 and json.loads(body)["api_url"] == f"http://127.0.0.1:{mine}/api", body[:300]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.timeout(0)  # the README runner bounds the steps it runs first
def test_browser_shows_the_run_the_table_the_grids_and_the_champion(readme):
    if chromium() is None:
        pytest.skip("chromium is not installed here (Debian: apt-get install -y chromium; .ci/run installs it)")
    o = readme.run_through(readme.block(check="deploy"))
    _passed(o)
    pages = o.pages
    assert pages, "the deploy step's check rendered no page"
    champion = "models:/amed-digits-nfe3@champion"
    home = visible_text(pages["home"])
    assert "Unable to connect" not in home and "Can't connect" not in home, home[:1000]
    run = visible_text(pages["run"])
    assert "Can't connect to Server API" not in run and pages["flow_run_name"] in run, run[:2000]
    assert "deploy-smoke-results" in run and "deploy-smoke-samples" in run and champion in run, run[:3000]
    table = visible_text(pages["artifact:deploy-smoke-results"])
    results = json.loads((readme.clone("main") / "amed-runs" / "stack" / "store" / "runs" / "deploy-smoke" /
                          "results.json").read_text())["results"]
    best = min((r for r in results if r["nfe"] == 3), key=lambda r: r["value"])
    for text in ("panel_best", "margin", "amed+ipndm", best["solver"], str(round(best["value"], 6))):
        assert text in table, (text, table[:3000])
    samples = pages["artifact:deploy-smoke-samples"]
    assert champion in visible_text(samples) and "Quality vs NFE" in visible_text(samples), visible_text(samples)[:2000]
    assert images(samples) >= 3, images(samples)   # the quality plot and the sample grids
    model = visible_text(pages["mlflow-model"])
    assert "amed-digits-nfe3" in model and "champion" in model, model[:2000]
