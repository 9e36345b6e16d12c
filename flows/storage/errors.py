"""The two errors every store raises (teacher shards and run files alike)."""

from __future__ import annotations

__all__ = ["StoreCredentialsError", "ShardVerificationError"]


class StoreCredentialsError(PermissionError):
    """The object store refused us for lack of (valid) credentials."""


class ShardVerificationError(RuntimeError):
    """A stored shard is missing, has the wrong size or checksum, or does not parse."""
