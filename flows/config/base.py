"""Primitives shared by the sweep schema's models (flows.config.schema, flows.config.families): the strict model
base, dataset/sweep names and the bounds that keep a typo from becoming an allocation deep inside a Ray task."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = ["StrictModel", "Name", "MAX_NFE", "MAX_SEED", "MAX_OPTION_DEPTH", "depth"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-' (starting with a letter or digit)")
    return v


Name = Annotated[str, AfterValidator(_check_name)]  # a dataset's or a sweep's name (store paths, tags, model names)

# Bounds that keep a typo from becoming an allocation or an overflow deep inside a Ray task: NFE 10**9 asks for a
# 10**9-point grid; torch seeds are 64-bit and every trajectory adds its index to the base seed.
from amed_core.bounds import MAX_NFE  # noqa: E402 - the one bound on NFE (checkpoints are checked against it too)

MAX_SEED = 2**53
MAX_OPTION_DEPTH = 8


def depth(v: Any, level: int = 0) -> int:
    if level > MAX_OPTION_DEPTH:
        return level
    if isinstance(v, dict):
        return max([depth(x, level + 1) for x in v.values()] or [level + 1])
    if isinstance(v, (list, tuple)):
        return max([depth(x, level + 1) for x in v] or [level + 1])
    return level


class StrictModel(BaseModel):
    """Every section of the sweep config: unknown fields refused, frozen, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
