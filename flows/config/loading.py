"""Loading a sweep config: a file read safely (regular, bounded, UTF-8), YAML parsed without alias bombs, and
validation errors formatted one line per bad field (its path and what is allowed there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from flows.config.schema import SweepConfig

__all__ = ["MAX_SWEEP_BYTES", "MAX_YAML_ALIASES", "MAX_YAML_NODES", "MAX_YAML_DEPTH", "load_sweep", "quickstart_path"]

# A sweep file is a few KiB; refuse large files and alias-heavy YAML (a "billion laughs" bomb) before parsing into memory.
MAX_SWEEP_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000
# The deepest a sweep nests is ~6 (datasets -> item -> options -> a value's list); PyYAML composes recursively and its
# time grows with depth squared (5,000 levels in 10 KB: 72 s, then a RecursionError), so depth is bounded on the event
# stream, before anything is composed.
MAX_YAML_DEPTH = 32


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent is not None else []
            msg = f"unknown field; allowed here: {allowed}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
            from flows.storage.credentials import redact

            shown = repr(redact(got))  # a URL's password is never echoed
            msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        lines.append(f"  {loc}: {msg}")
    return "invalid sweep config:\n" + "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = SweepConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
            for inner in getattr(cand, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        model = nxt
    return model


def quickstart_path() -> Path:
    """configs/quickstart.yaml of this checkout, or of the installed wheel (flows/configs, a link to ../configs)."""
    here = Path(__file__).resolve().parents[1]  # flows/ (this file is flows/config/loading.py)
    for cand in (here.parent / "configs" / "quickstart.yaml", here / "configs" / "quickstart.yaml"):
        if cand.is_file():
            return cand
    raise ValueError("configs/quickstart.yaml not found: pass a sweep file (amed distill PATH.yaml)")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a long one-line YAML text taken for a file name
        return False


def _read_sweep_file(path: Path, name: str) -> str:
    """The text of a sweep file: a regular file of at most MAX_SWEEP_BYTES (:func:`amed_core.io.read_limited`: checked
    on the opened file before reading; a FIFO or a device would block or never end)."""
    from amed_core.io import read_limited

    try:
        data = read_limited(path, MAX_SWEEP_BYTES, what=f"sweep file {name!r}")
    except FileNotFoundError:
        raise ValueError(f"sweep file {name!r} does not exist") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"sweep file {name!r} is not UTF-8 text (a YAML/JSON sweep config is)") from None


def _safe_yaml(text: str) -> Any:
    """yaml.safe_load after refusing, on the event stream (aliases not expanded), text that is too large or uses too
    many aliases (a "billion laughs" bomb expands a few hundred bytes into gigabytes)."""
    import yaml

    if len(text) > MAX_SWEEP_BYTES:
        raise ValueError(f"sweep config is {len(text)} characters; at most {MAX_SWEEP_BYTES} are read")
    try:
        aliases, sizes, stack = 0, {}, [[None, 0]]  # stack: [anchor, expanded node count] per open collection
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                stack[-1][1] += sizes.get(event.anchor, 1)
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([event.anchor, 1])
                if len(stack) > MAX_YAML_DEPTH + 1:
                    raise ValueError(f"sweep config is nested more than {MAX_YAML_DEPTH} levels deep; a sweep needs "
                                     "fewer than 10 (is it the right file?)")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, n = stack.pop()
                if anchor is not None:
                    sizes[anchor] = n
                stack[-1][1] += n
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    sizes[event.anchor] = 1
                stack[-1][1] += 1
            if aliases > MAX_YAML_ALIASES or stack[0][1] > MAX_YAML_NODES or any(f[1] > MAX_YAML_NODES for f in stack[-1:]):
                raise ValueError(f"sweep config expands, through YAML aliases (*name), to more than {MAX_YAML_NODES} values "
                                 f"or uses more than {MAX_YAML_ALIASES} aliases; write the values out instead")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"sweep config is not valid YAML/JSON: {e}") from None


def load_sweep(source: Union["SweepConfig", dict, str, Path], **overrides: Any) -> SweepConfig:
    """A validated SweepConfig from a model, a dict, a YAML/JSON file path or a YAML/JSON string.

    ``overrides`` replace top-level fields (e.g. ``store_url=``). Raises ValueError listing every bad
    field's path and what is allowed.
    """
    if isinstance(source, SweepConfig):
        data = source.model_dump(mode="json")
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, Path)):
        text = str(source)
        path = Path(text).expanduser()
        if isinstance(source, Path) or (("\n" not in text) and (text.endswith((".yaml", ".yml", ".json")) or _is_file(path))):
            text = _read_sweep_file(path, text)
        data = _safe_yaml(text)
        if not isinstance(data, dict):
            raise ValueError("sweep config must be a mapping with at least 'datasets'")
    else:
        raise ValueError(f"sweep must be a SweepConfig, dict, or path/YAML text, not {type(source).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(_format(e)) from None
