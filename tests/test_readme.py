"""Every README step runs as written, in README order, in a fresh copy of the repository whose environment was made by
the README's own install command for it (tests/readme_blocks.py: the steps and their annotations; tests/fixtures_readme.py:
the runner; tests/readme_hooks.py: setups and checks; docs/DESIGN.md "README blocks": the convention).

A step that needs a package its install does not install fails here (issue 19: the deploy block needed moto's server,
which only the test extra installs, and its test passed in the test environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_readme import ROOT, blocks
from readme_blocks import RUNNABLE, parse_readme

pytestmark = [pytest.mark.slow, pytest.mark.services]

BLOCKS = blocks()


def test_readme_steps_are_annotated_consistently():
    envs: dict[str, list] = {}
    for b in BLOCKS:
        envs.setdefault(b.env, []).append(b)
        # every step says how it is covered (at least its time bound): a new section opts in explicitly
        assert b.notes, f"README.md:{b.line} ({b.section}): a step without a readme-test annotation"
        if b.lang == "yaml":
            assert b.file or b.sweep or b.skip, f"README.md:{b.line}: a yaml block needs file=PATH, sweep or skip=REASON"
        if b.install:
            assert "pip install" in b.code and "python3 -m venv .venv" in b.code, f"README.md:{b.line}"
        assert b.timeout > 0
    for env, bs in envs.items():
        installs = [b for b in bs if b.install]
        runnable = [b for b in bs if not b.skip]
        assert len(installs) == 1 and runnable[0] is installs[0], \
            f"environment {env!r}: its first step that runs must be its one install step, got {[b.id for b in installs]}"
    assert all(b.lang in RUNNABLE for b in BLOCKS)


def test_annotation_errors_name_the_line(tmp_path):
    bad = tmp_path / "R.md"
    bad.write_text("# T\n<!-- readme-test: envv=main -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match=r"README.md:2: unknown readme-test key 'envv'"):
        parse_readme(bad)
    bad.write_text("# T\n<!-- readme-test: skip=x -->\n\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match=r"README.md:2: a readme-test annotation must be on the line just above"):
        parse_readme(bad)


def test_ci_runs_the_readme_test_command_exactly():
    """`.ci/run` runs the README's test command, as its last line (after installing Chromium for the browser test)."""
    [test_block] = [b for b in BLOCKS if ".venv/bin/python -m pytest" in b.code]
    command = test_block.code.strip()
    assert "\n" not in command and test_block.skip
    lines = [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[-1] == command, lines[-1]
    assert any("chromium" in x for x in lines[:-1])


@pytest.mark.timeout(0)  # the runner bounds each step (its timeout=, default 300 s); asking for one runs those before it
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_step(readme, block):
    o = readme.run_through(block)
    if o.status == "skipped":
        pytest.skip(o.detail)
    assert o.status == "passed", f"README.md:{block.line} ({block.section}): {o.detail}"


def test_a_step_needing_a_package_its_install_lacks_fails(tmp_path):
    """The runner's point: steps run in the environment their install made, not in this test's (which has PyYAML)."""
    from fixtures_readme import Workspace

    fake = tmp_path / "README.md"
    fake.write_text("# Install\n<!-- readme-test: install -->\n```bash\npython3 -m venv --without-pip .venv\n```\n"
                    "# Use\n```python\nimport yaml\n```\n```bash\necho never\n```\n")
    ws = Workspace(tmp_path / "ws", {}, {}, readme=fake)
    try:
        last = ws.run_through(ws.blocks[-1])
        first, step = ws.outcomes[0], ws.outcomes[1]
        assert first.status == "passed", first.detail
        assert step.status == "failed" and "No module named 'yaml'" in step.detail, step.detail
        assert last.status == "failed" and "not run: step 01-use-python" in last.detail, last.detail
    finally:
        ws.close()
