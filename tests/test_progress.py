"""Progress output degrades to periodic lines off a terminal; losses at 4 significant digits."""

from __future__ import annotations

import io

import pytest

from amed_core.progress import LineProgress, fmt_loss, progress


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    monkeypatch.delenv("AMED_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(total=1000, desc="train", unit="step", file=out, interval=3600)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss=0.0123456789)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 1  # one line at the end, none per update
    assert text.startswith("train: 1000/1000 step (100%), ") and text.rstrip().endswith("loss=0.01235")
    assert list(progress(range(5), file=out)) == list(range(5))
    tty = TTY()
    bar = progress(total=3, file=tty)
    assert type(bar).__name__ == "tqdm"
    bar.close()
    monkeypatch.setenv("AMED_PROGRESS", "lines")
    assert isinstance(progress(total=3, file=TTY()), LineProgress)
    monkeypatch.setenv("AMED_PROGRESS", "sideways")
    with pytest.raises(ValueError, match="AMED_PROGRESS"):
        progress(total=3)


def test_periodic_lines(monkeypatch):
    import amed_core.progress as mod

    clock = iter(float(t) for t in range(0, 10_000, 4))
    monkeypatch.setattr(mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(total=10, desc="teacher", unit="traj", interval=10, file=out)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert 3 <= out.getvalue().count("\n") <= 5  # every ~10 s of a 40 s run, plus the end


def test_fmt_loss():
    assert fmt_loss(0.012345678901234) == "0.01235" and fmt_loss(1.23456e-5) == "1.235e-05"
    assert fmt_loss(float("nan")) == "nan" and fmt_loss(None) == "None"
