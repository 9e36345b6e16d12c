"""The one reader of a user-given path or fsspec URL (Inception weights, FID statistics, sample grids)."""

from __future__ import annotations

from typing import Optional

__all__ = ["read_url", "MAX_URL_BYTES"]

#: The Inception weights are ~92 MB, FID statistics ~32 MB; a file a user names is read only up to this.
MAX_URL_BYTES = 2 << 30


def read_url(url: str, what: str = "file", storage_options: Optional[dict] = None, limit: int = MAX_URL_BYTES) -> bytes:
    """Bytes of a local path or fsspec URL (the user's own copies; nothing is downloaded from a hub), at most ``limit``
    (:func:`flows.storage.reads.read_object`: a FIFO or a device is refused, a larger file refused before it is read).

    A missing object raises ValueError naming ``what`` (e.g. ``"--weights"``, ``"evaluation.fid_stats"``)."""
    import fsspec

    from flows.storage.reads import read_object

    try:
        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        return read_object(fs, path, limit, what=f"{what} ({url})")
    except FileNotFoundError:
        raise ValueError(f"{what}: nothing at {url!r}; give the path or URL of your copy") from None
