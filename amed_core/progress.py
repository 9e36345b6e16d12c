"""Progress that suits where it is written: a tqdm bar on a terminal, periodic plain lines elsewhere (log files,
CI, Prefect/Ray workers), where carriage-return updates would flood the output.

    bar = progress(total=1000, desc="train", unit="step")
    for ...:
        bar.update(1); bar.set_postfix(loss=f"{loss:.4g}")
    bar.close()

``AMED_PROGRESS=bar|lines|off`` overrides the choice (default ``auto``: a bar when the stream is a TTY).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

__all__ = ["progress", "LineProgress", "fmt_loss"]


def fmt_loss(value) -> str:
    """A loss or metric at 4 significant digits (``0.01235``, ``1.235e-05``), ``nan`` as such."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` API, printing one line at most every ``interval`` seconds
    (and at the end): ``desc: 300/1000 step (30%), 12.1 s, loss=0.01235``."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", interval: float = 10.0,
                 file: Optional[TextIO] = None, disable: bool = False):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, float(interval)
        self.file, self.disable = file, disable
        self.n, self.postfix = 0, ""
        self.t0 = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={fmt_loss(v) if isinstance(v, float) else v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def _emit(self) -> None:
        if self.disable:
            return
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct}, {time.monotonic() - self.t0:.1f} s{extra}",
              file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):  # pragma: no cover - wrapping iterables is done by progress(iterable=)
        raise TypeError("use progress(iterable=...) to wrap an iterable")


class _Iter(LineProgress):
    def __init__(self, iterable, **kw):
        if kw.get("total") is None:
            try:
                kw["total"] = len(iterable)
            except TypeError:
                pass
        super().__init__(**kw)
        self._it = iterable

    def __iter__(self):
        for x in self._it:
            yield x
            self.update(1)
        self.close()


def progress(iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it", disable: bool = False,
             interval: float = 10.0, file: Optional[TextIO] = None, mode: Optional[str] = None):
    """A tqdm bar on a terminal, :class:`LineProgress` lines (every ``interval`` s) otherwise; ``iterable`` is wrapped
    like tqdm's. ``mode``/``AMED_PROGRESS``: ``auto`` (default), ``bar``, ``lines`` or ``off``."""
    mode = (mode or os.environ.get("AMED_PROGRESS") or "auto").lower()
    if mode not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"AMED_PROGRESS must be auto, bar, lines or off, got {mode!r}")
    stream = file or sys.stderr
    disable = disable or mode == "off"
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if mode == "bar" or (mode == "auto" and tty):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, dynamic_ncols=True)
    kw = dict(total=total, desc=desc, unit=unit, interval=interval, file=file, disable=disable)
    return _Iter(iterable, **kw) if iterable is not None else LineProgress(**kw)
