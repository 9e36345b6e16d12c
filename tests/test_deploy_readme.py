"""The README's "Deploying at scale" block: what it must contain, and the deployment's typed `sweep` parameter.

The block itself runs as written in tests/test_readme.py (the README runner: a fresh copy of the repository on the
README's own install, the stack's ports from its AMED_* settings; check "deploy" in tests/readme_hooks.py: it ends
with a champion fetched from the MLflow server the stack started, the watch output carries the results table and
champion URIs, the flow names the registry and store it used) and tests/test_ui.py looks at its UIs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
                   "amed fetch models:/amed-digits-nfe3@champion"):
        assert needed in block, needed
    assert "--tracking-uri" not in block  # the tracking URI comes from the stack's env
    assert (ROOT / "configs" / "deploy-smoke.yaml").is_file()
    # chained: a failed step stops the block (no prefect against a stack that is not up); down is a block of its own
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert all(c.endswith("&&") for c in commands[:-1]) and not commands[-1].endswith("&&"), commands
    assert "local-stack.sh down" not in block


def test_sweep_parameter_is_typed_and_described():
    """The deployment's `sweep` parameter in the Prefect UI: a path or a SweepConfig object, with a description."""
    from flows.distill import distill

    p = distill.parameters.model_dump()["properties"]["sweep"]
    kinds = [a.get("type") or a.get("$ref") for a in p["anyOf"]]
    assert "string" in kinds and any("SweepConfig" in str(k) for k in kinds)
    assert "path of a YAML file" in p["description"] and "MLFLOW_TRACKING_URI" in p["description"]
    assert p["default"] == "configs/quickstart.yaml"
