"""Load a YAML config into a pydantic model with one readable line per problem.

Each error names the dotted key and, where YAML knows it, the line in the file; unknown keys get a
did-you-mean suggestion. Only ``yaml.safe_load``/``compose`` are used: no arbitrary objects.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mlipctl.errors import UserInputError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserInputError):
    """A config that does not validate; ``problems`` holds one line per issue."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            text = f"invalid config {source}: {problems[0]}"
        else:
            text = f"invalid config {source} ({len(problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in problems
            )
        super().__init__(text)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse a YAML mapping; return the data and a map from key path to 1-based line number."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"config file not found: {p}")
    if p.is_dir():
        raise UserInputError(f"config path is a directory, not a YAML file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"config file is not text (YAML expected): {p}") from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, source: str = "<string>") -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse YAML text (safe loader only); see :func:`read_yaml`."""
    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise UserInputError(f"config file is empty: {source}")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"config {source} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise UserInputError(f"config file is empty: {source}")
    if not isinstance(data, dict):
        raise UserInputError(
            f"config {source} must be a YAML mapping of keys to values, got {type(data).__name__}"
        )
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[(*path, key)] = k.start_mark.line + 1
            _collect_lines(v, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _collect_lines(v, (*path, i), out)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating mappings on the way (for ``--set`` overrides)."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value`` with the value parsed as YAML (so numbers, lists and bools work)."""
    if "=" not in item:
        raise UserInputError(f"--set expects KEY=VALUE (e.g. training.epochs=5), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserInputError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def validate_config(
    model: type[M],
    data: dict[str, Any],
    *,
    source: str = "<config>",
    lines: dict[tuple, int] | None = None,
    check_files: bool = True,
) -> M:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` with one line per problem."""
    try:
        return model.model_validate(data, context={"check_files": check_files})
    except ValidationError as exc:
        raise ConfigError(source, format_errors(model, exc, data, lines or {})) from None


def load_config(
    model: type[M],
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> M:
    """Read, override and validate a YAML config file."""
    data, lines = read_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_config(model, data, source=str(path), lines=lines, check_files=check_files)


def format_errors(
    model: type[BaseModel], exc: ValidationError, data: dict[str, Any], lines: dict[tuple, int]
) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = _data_loc(tuple(err["loc"]), data)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_for(loc, lines)
        where = f" (line {line})" if line else ""
        etype = err["type"]
        if etype == "extra_forbidden":
            parent = _model_at(model, tuple(err["loc"])[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{guess[0]}'?" if guess else "."
            if ":" in str(loc[-1]):
                # '{kind:none}' is one key to YAML: flow mappings need ': ' with a space.
                hint += " (YAML reads 'key:value' without a space as a single key)"
            known = f" Allowed keys here: {', '.join(allowed)}." if allowed else ""
            msg = f"{dotted}{where}: unknown key{hint}{known}"
        elif etype == "missing":
            msg = f"{dotted}{where}: required key is missing"
        elif etype == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = (
                f"{dotted}{where}: unknown {_tag(ctx)} "
                f"{ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
            )
        elif etype == "union_tag_not_found":
            ctx = err.get("ctx", {})
            msg = f"{dotted}{where}: needs a {_tag(ctx)} key"
        else:
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, ") :]
            given = err.get("input")
            show = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
            msg = f"{dotted}{where}: {text}{show}"
        if msg not in seen:
            seen.add(msg)
            out.append(msg)
    return out


def _tag(ctx: dict[str, Any]) -> str:
    """pydantic quotes the discriminator name ("'kind'"); show it bare."""
    return str(ctx.get("discriminator", "kind")).strip("'")


def _data_loc(loc: tuple, data: Any) -> tuple:
    """Drop the discriminator tags pydantic inserts into ``loc`` so it matches the YAML keys."""
    out: list = []
    cur = data
    for part in loc:
        if isinstance(cur, dict):
            if part in cur:
                out.append(part)
                cur = cur[part]
            elif isinstance(part, str) and part.startswith("function-"):
                continue
            elif isinstance(cur.get("kind"), str) and part == cur.get("kind"):
                continue  # union tag
            else:
                out.append(part)
                cur = None
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        else:
            if isinstance(part, str) and (part.startswith("function-") or "[" in part):
                continue
            out.append(part)
            cur = None
    return tuple(out)


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines and (n > 0 or not loc):
            return lines[loc[:n]]
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Resolve the model class at a pydantic error location (following unions by their tag)."""
    cur: Any = model
    for part in loc:
        cur = _unwrap(cur, part)
        if cur is None:
            return None
    cur = _unwrap(cur, None)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(tp: Any, part: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0], part)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if part is not None and isinstance(part, str):
            for a in args:
                a0 = _unwrap(a, None)
                if isinstance(a0, type) and issubclass(a0, BaseModel):
                    kind = a0.model_fields.get("kind")
                    if kind is not None and kind.default == part:
                        return a0
        if len(args) == 1:
            return _unwrap(args[0], part)
        if part is None:
            return tp
        # an untagged union: descend into the first model that has this field
        for a in args:
            a0 = _unwrap(a, None)
            if isinstance(a0, type) and issubclass(a0, BaseModel) and part in a0.model_fields:
                return a0.model_fields[part].annotation
        return None
    if part is None:
        return tp
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    if origin in (list, tuple, set, frozenset) and isinstance(part, int):
        args = typing.get_args(tp)
        return args[0] if args else None
    if origin is dict:
        args = typing.get_args(tp)
        return args[1] if args else None
    return None
