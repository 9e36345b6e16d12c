"""The README as a new user follows it: a fresh copy of the repository per environment, each environment made by the
README's own install command, and every step run in order (tests/readme_blocks.py parses the steps and their
annotations; docs/DESIGN.md "README blocks" states the convention).

The fixture ``readme`` (session scope, in tests/conftest.py so that every module shares one) is the
:class:`Workspace`; ``readme.run_through(block)`` runs every step of the block's environment up to and including it
(each once per session) and returns its :class:`Outcome` (tests/test_readme.py runs every step; tests/test_ui.py opens
the UIs of what the steps made).

A step runs in a new terminal's environment (PATH, HOME, LANG, ...; nothing of this test process leaks in), with its
own HOME (holding a copy of the user's pip configuration; pip's cache, PIP_* and proxy variables kept: the
machine's package sources), OMP_NUM_THREADS as the suite has it, and the local stack's ports and
timeouts set through its AMED_* variables (never by editing a block). Everything lives under one temporary folder;
at the end the stack is brought down and any process still naming that folder is killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_blocks import Block, parse_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TRACE = 'PS4="+ @@step \\$(date +%s.%N) "; set -x\n'   # bash -x with a timestamp per command: each step's time


def blocks() -> list[Block]:
    return parse_readme(README)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree: what a fresh clone of it holds (a clone of the
    committed tree in CI; here also the uncommitted work under test)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def pg_installable() -> bool:
    import glob

    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or (os.geteuid() == 0 and shutil.which("apt-get"))


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def processes_naming(text: str) -> dict[int, str]:
    """{pid: command line} of the processes (not this one) whose command line contains ``text``."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and running(int(d.name)):
                out[int(d.name)] = cmd
    return out


@dataclass
class Outcome:
    block: Block
    status: str                      # passed | failed | skipped
    detail: str = ""                 # why (failed / skipped), with the output's tail
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    steps: dict = field(default_factory=dict)   # bash: each command's seconds (from the trace)
    pages: dict = field(default_factory=dict)   # UI pages a check rendered while the step's services ran


class Workspace:
    def __init__(self, base: Path, setups: dict[str, Callable], checks: dict[str, Callable], readme: Path = README):
        self.base, self.setups, self.checks = base, setups, checks
        self.blocks = parse_readme(readme)
        self.outcomes: dict[int, Outcome] = {}
        self.home = base / "home"
        self.home.mkdir(parents=True)
        for conf in (".config/pip/pip.conf", ".pip/pip.conf"):  # the user's pip configuration (indexes, wheels)
            if (Path.home() / conf).is_file():
                (self.home / conf).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path.home() / conf, self.home / conf)
        self.ports = {k: str(free_port()) for k in ("AMED_PREFECT_PORT", "AMED_MLFLOW_PORT", "AMED_PG_PORT",
                                                    "AMED_S3_PORT")}

    # -- environments ------------------------------------------------------------------------------------------
    def clone(self, env: str) -> Path:
        repo = self.base / env / "amed-distill"
        if not repo.exists():
            repo.mkdir(parents=True)
            copy_checkout(repo)
        return repo

    def environ(self, env: str, activated: bool) -> dict[str, str]:
        """A new terminal's environment (and, once the install has run, with ``.venv`` activated)."""
        keep = ("PATH", "LANG", "LC_ALL", "TERM", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR", "OMP_NUM_THREADS",
                "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
        net = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
        out = {k: v for k, v in os.environ.items() if k in keep or k.startswith(net)}  # the machine's pip and network
        # no virtualenv of this test run on PATH (an activated one would lend its packages to the steps)
        out["PATH"] = os.pathsep.join(p for p in out.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                      if p and not (Path(p).parent / "pyvenv.cfg").is_file())
        real_cache = os.environ.get("PIP_CACHE_DIR") or str(Path(os.environ.get("XDG_CACHE_HOME")
                                                                 or Path.home() / ".cache") / "pip")
        out.update(HOME=str(self.home), PIP_CACHE_DIR=real_cache, COLUMNS="200", AMED_STACK_TIMEOUT="240",
                   AMED_MLFLOW_WORKERS="1", **self.ports)
        if activated:
            venv = self.clone(env) / ".venv"
            out.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{out.get('PATH', '')}")
        return out

    # -- running ---------------------------------------------------------------------------------------------
    def block(self, check: str = "", index: Optional[int] = None) -> Block:
        """The step with annotation ``check=NAME`` (or at ``index``)."""
        found = [b for b in self.blocks if (b.check == check if check else b.index == index)]
        assert len(found) == 1, f"README has {len(found)} blocks with check={check!r}"
        return found[0]

    def run_through(self, target: Block) -> Outcome:
        for b in self.blocks[: target.index + 1]:
            if b.env == target.env and b.index not in self.outcomes:
                try:
                    self.outcomes[b.index] = self._run(b)
                except BaseException as e:  # noqa: BLE001 - the runner's own failure (or an interrupt), recorded
                    import traceback

                    self.outcomes[b.index] = Outcome(b, "failed", f"the runner failed: {e!r}\n{traceback.format_exc()}")
                    if not isinstance(e, Exception):
                        raise
        return self.outcomes[target.index]

    def _earlier_failure(self, b: Block) -> Optional[Outcome]:
        return next((o for i, o in sorted(self.outcomes.items()) if i < b.index and o.block.env == b.env
                     and o.status == "failed"), None)

    def _run(self, b: Block) -> Outcome:
        if b.skip:
            return Outcome(b, "skipped", f"README says: {b.skip}")
        failed = self._earlier_failure(b)
        if failed is not None:
            return Outcome(b, "failed", f"not run: step {failed.block.id} (README.md:{failed.block.line}) failed first")
        if "postgres" in b.needs and not pg_installable():
            return Outcome(b, "skipped", "needs PostgreSQL server binaries (or root with apt-get) on this machine")
        repo = self.clone(b.env)
        if b.setup:
            self.setups[b.setup](self, repo)
        if b.file:
            path = repo / b.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code)
            return Outcome(b, "passed", f"wrote {b.file}")
        if b.sweep:
            return self._check_sweep(b)
        t0 = time.time()
        env = self.environ(b.env, activated=not b.install)
        if b.lang == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", TRACE + b.code]
            stdin = None
        else:
            cmd, stdin = [str(repo / ".venv" / "bin" / "python"), "-"], b.code
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=b.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        except BaseException:  # interrupted (Ctrl-C, a test timeout): the step's processes go too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        seconds = time.time() - t0
        (self.base / "logs").mkdir(exist_ok=True)
        (self.base / "logs" / f"{b.id}.log").write_text(f"$ {b.code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}")
        o = Outcome(b, "passed", "", seconds, out, err, _steps(err, t0 + seconds) if b.lang == "bash" else {})
        if timed_out or proc.returncode != 0:
            why = f"timed out after {b.timeout} s" if timed_out else f"exit {proc.returncode} after {seconds:.0f} s"
            o.status, o.detail = "failed", f"{why}\n--- stdout ---\n{out[-5000:]}\n" \
                                           f"--- stderr ---\n{err[-6000:]}{self._stack_logs(repo)}"
            return o
        if b.install and (repo / ".venv" / "bin" / "pip").exists():
            check = subprocess.run([str(repo / ".venv" / "bin" / "pip"), "check"], capture_output=True, text=True,
                                   env=env, timeout=600)
            if check.returncode != 0:  # e.g. botocore outside aiobotocore's window
                o.status, o.detail = "failed", f"pip check after the install:\n{check.stdout}{check.stderr}"
                return o
        if b.check:
            try:
                self.checks[b.check](self, repo, o)
            except AssertionError as e:
                o.status, o.detail = "failed", f"check {b.check}: {e}"
        return o

    def _check_sweep(self, b: Block) -> Outcome:
        import yaml

        from flows.config import load_sweep

        data = yaml.safe_load(b.code)
        if "datasets" not in data:  # a fragment: on a minimal sweep
            data = {"datasets": [{"name": "digits", "teacher": "digits-gmm"}], **data}
        try:
            load_sweep(data)
        except ValueError as e:
            return Outcome(b, "failed", f"the sweep does not load: {e}")
        return Outcome(b, "passed", "a valid sweep")

    def _stack_logs(self, repo: Path) -> str:
        logs = sorted((repo / "amed-runs" / "stack" / "logs").glob("*.log"))
        return "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}" for p in logs)

    def close(self) -> None:
        for env_dir in self.base.iterdir():
            script = env_dir / "amed-distill" / "infra" / "local-stack.sh"
            if script.is_file():
                subprocess.run(["bash", str(script), "down"], cwd=script.parents[1], env=self.environ("x", False),
                               capture_output=True, timeout=180)
        for pid in processes_naming(str(self.base)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def times(self) -> list[dict]:
        """Each step's wall time (and each bash command's), for the README's stated times."""
        return [{"block": o.block.id, "line": o.block.line, "status": o.status, "seconds": round(o.seconds, 1),
                 "steps": o.steps} for _, o in sorted(self.outcomes.items())]


def _steps(stderr: str, end: float) -> dict:
    marks = [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^\+ @@step (\d+\.\d+) (.*)$", stderr, re.M)]
    marks = [m for m in marks if not m[1].startswith(("PS4=", "set -x"))]
    return {marks[i][1][:90]: round((marks[i + 1][0] if i + 1 < len(marks) else end) - marks[i][0], 1)
            for i in range(len(marks))}


def make_workspace(setups: dict, checks: dict):
    """A pytest fixture body: the session's Workspace in a folder PostgreSQL (run as `postgres` by root) can reach."""
    base = Path(tempfile.mkdtemp(prefix="amed-readme-"))
    base.chmod(0o711)
    ws = Workspace(base, setups, checks)
    try:
        yield ws
    finally:
        times = ws.times()
        print("\nREADME steps (seconds):\n" + "\n".join(f"  {t['block']:<58} {t['status']:<8} {t['seconds']:>7}"
                                                     for t in times))
        if os.environ.get("AMED_README_TIMES"):  # a JSON file with every bash command's time too
            Path(os.environ["AMED_README_TIMES"]).write_text(json.dumps(times, indent=1))
        ws.close()
        shutil.rmtree(base, ignore_errors=True)
