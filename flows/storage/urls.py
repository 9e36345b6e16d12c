"""The one reader of a user-given path or fsspec URL (Inception weights, FID statistics, sample grids)."""

from __future__ import annotations

from typing import Optional

__all__ = ["read_url"]


def read_url(url: str, what: str = "file", storage_options: Optional[dict] = None) -> bytes:
    """Bytes of a local path or fsspec URL (the user's own copies; nothing is downloaded from a hub).

    A missing object raises ValueError naming ``what`` (e.g. ``"--weights"``, ``"evaluation.fid_stats"``)."""
    import fsspec

    try:
        with fsspec.open(str(url), "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: nothing at {url!r}; give the path or URL of your copy") from None
