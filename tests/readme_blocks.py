"""README.md as the sequence of blocks a new user pastes, with what each one needs (tests/test_readme.py runs them).

A fenced block whose language is ``bash``, ``python`` or ``yaml`` is a step; other blocks (diagrams, ``text``) are not.
Every step is preceded (on the line just above its fence) by one annotation comment (tests/test_readme.py checks)::

    <!-- readme-test: env=main; install; timeout=1200; needs=postgres; check=deploy -->

Keys (docs/DESIGN.md, "README blocks"):

- ``env=NAME``: the environment the block runs in (default ``main``). Each environment is a fresh copy of the
  repository (what a clone holds) with its own ``.venv``, made by that environment's ``install`` block.
- ``install``: this block makes its environment (it holds the install command, e.g. ``pip install -e .``); it must
  be the environment's first block. A block needing a package the install does not install fails.
- ``skip=REASON``: not run; the reason says why (the test suite itself, a cluster-sized sweep).
- ``file=PATH``: the block is the content of a file the user saves (``mymodels.py``): written, not run.
- ``sweep``: a YAML sweep or a fragment of one: checked with ``flows.config.load_sweep`` (merged onto a minimal
  sweep when it names no dataset).
- ``timeout=SECONDS`` (default 300), ``needs=A,B`` (``postgres``: PostgreSQL server binaries or root with apt-get;
  otherwise the block is skipped, saying so), ``setup=NAME`` (a hook in tests/test_readme.py that puts the files the
  text tells the user to bring in place, e.g. Inception weights), ``check=NAME`` (a hook that checks what the block
  made, e.g. the fetched champion).

Steps run in README order within their environment: bash in a fresh ``bash -e -o pipefail`` with ``.venv``
activated (as the README says), python in a fresh ``.venv/bin/python``, both from the repository root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Block", "parse_readme", "KEYS", "RUNNABLE"]

RUNNABLE = ("bash", "python", "yaml")
KEYS = ("env", "install", "skip", "file", "sweep", "timeout", "needs", "setup", "check")
_NOTE = re.compile(r"^<!--\s*readme-test:(.*?)-->\s*$")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    index: int                     # position among the README's steps (0-based)
    lang: str
    code: str
    line: int                      # 1-based line of the opening fence
    section: str                   # the nearest heading above it
    env: str = "main"
    install: bool = False
    skip: str = ""
    file: str = ""
    sweep: bool = False
    timeout: int = 300
    needs: tuple[str, ...] = ()
    setup: str = ""
    check: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        words = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"{self.index:02d}-{words}-{self.lang}"

    @property
    def runs(self) -> bool:
        """Executed (bash / python), as opposed to written (file=), checked (sweep) or skipped."""
        return not (self.skip or self.file or self.sweep) and self.lang in ("bash", "python")


def _annotation(text: str, where: str) -> dict:
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in KEYS:
            raise ValueError(f"{where}: unknown readme-test key {key!r} (known: {', '.join(KEYS)})")
        if key in ("install", "sweep"):
            out[key] = True
        elif not eq or not value:
            raise ValueError(f"{where}: readme-test key {key!r} needs a value ({key}=...)")
        elif key == "timeout":
            out[key] = int(value)
        elif key == "needs":
            out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
        else:
            out[key] = value
    return out


def parse_readme(path: Path) -> list[Block]:
    """Every step of the README at ``path``, in order, with its annotation (ValueError for a malformed one, or for an
    annotation that is not on the line just above a step's fence)."""
    lines = Path(path).read_text().splitlines()
    blocks: list[Block] = []
    section, i, pending = "", 0, None
    while i < len(lines):
        line = lines[i]
        note = _NOTE.match(line)
        fence = _FENCE.match(line)
        if pending is not None and not fence:
            raise ValueError(f"README.md:{pending[1] + 1}: a readme-test annotation must be on the line just above a "
                             "bash, python or yaml block's fence")
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if note:
            pending = (_annotation(note.group(1), f"README.md:{i + 1}"), i)
        elif fence:
            lang, start = fence.group(1), i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            notes = pending[0] if pending else {}
            if pending and lang not in RUNNABLE:
                raise ValueError(f"README.md:{start + 1}: readme-test annotation on a {lang or 'plain'} block")
            if lang in RUNNABLE:
                blocks.append(Block(index=len(blocks), lang=lang, code="\n".join(body) + "\n", line=start + 1,
                                    section=section, **notes, notes=notes))
            pending = None
        i += 1
    return blocks
