"""Headless Chromium (Debian's `chromium` package) for the UI tests: a page's DOM after its scripts ran and its API
calls answered (`--dump-dom` after a `--virtual-time-budget`), in a fresh profile each time, with no network besides
the page's own server."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from typing import Optional

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def chromium() -> Optional[str]:
    """The Chromium executable (Debian: /usr/bin/chromium), or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, *, budget_ms: int = 30000, timeout: float = 180) -> str:
    """The rendered DOM of ``url``."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="amed-chromium-") as profile:
        r = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                            "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"chromium --dump-dom {url}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return r.stdout


def screenshot(url: str, png, *, budget_ms: int = 30000, size: str = "1400,1200", timeout: float = 180) -> None:
    """A PNG of ``url`` as rendered (for people looking at a page a test checked)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="amed-chromium-") as profile:
        subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                        f"--window-size={size}", f"--screenshot={png}", url], capture_output=True, timeout=timeout)


def visible_text(dom: str) -> str:
    """The text a reader sees: no scripts, styles or tags; entities decoded; whitespace collapsed."""
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(html.unescape(text).split())


def images(dom: str) -> int:
    return len(re.findall(r"<img\b", dom, re.I))
