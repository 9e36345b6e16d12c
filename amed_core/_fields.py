"""One check shared by every config dataclass's ``from_dict``: unknown keys are a ValueError naming them."""

from __future__ import annotations

from dataclasses import fields
from typing import Mapping


def check_fields(cls, d: Mapping, what: str | None = None) -> None:
    """Raise ValueError listing the keys of ``d`` that are not fields of dataclass ``cls`` (and the allowed ones)."""
    allowed = {f.name for f in fields(cls)}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
