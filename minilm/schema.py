"""The dict/JSON/command-line form of frozen configs, and their one-line checks.

Every config in the lab (model, data, training, analysis, studies) is a frozen dataclass that checks
itself on construction and fails with a one-line `ConfigError` naming the field and what is allowed.
`from_dict` / `to_dict` / `override` give them all the same JSON and command-line form.

A polymorphic field (a position encoding, say) is typed with a base class that declares
`registry: ClassVar[dict[str, type]]` (kind -> subclass); each subclass names its `kind`. Its dict
form carries the kind ({'kind': 'rope', 'base': 1e5}, or just 'rope').
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
  """A bad config value; str(err) is one line: '<field>: <what is wrong>'."""


def check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def check_choice(field: str, value: Any, allowed: typing.Iterable[Any]) -> None:
  allowed = tuple(allowed)
  check(value in allowed, field, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")


# A field added after runs were written: to_dict leaves it out while it has its default, so the
# config.json, checkpoints and stage hashes of those runs stay what they were.
OPTIONAL = {"optional": True}


def _prefix(cls) -> str:
  section = getattr(cls, "section", "")
  return f"{section}." if section else ""


def _registry(cls) -> dict | None:
  """The kind -> class registry when `cls` is a polymorphic base (it declares `registry` itself)."""
  return vars(cls).get("registry") if isinstance(cls, type) else None


def from_dict(cls, data: Mapping[str, Any], prefix: str | None = None):
  """Build config `cls` from a (nested) dict, naming unknown fields and bad types in the error."""
  if isinstance(data, cls):
    return data
  prefix = _prefix(cls) if prefix is None else prefix
  where = prefix.rstrip(".") or cls.__name__
  registry = _registry(cls)
  if registry is not None:
    if isinstance(data, str):
      data = {"kind": data}
    check(isinstance(data, Mapping) and "kind" in data, where,
          f"expected a kind, one of {', '.join(map(repr, registry))}; got {data!r}")
    check_choice(f"{where}.kind", data["kind"], registry)
    return from_dict(registry[data["kind"]], {k: v for k, v in data.items() if k != "kind"}, where + ".")
  check(isinstance(data, Mapping), where, f"expected a mapping; got {data!r}")
  types = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - fields)
  check(not unknown, f"{prefix}{unknown[0]}" if unknown else where,
        f"unknown field; allowed: {_listed(fields)}")
  kwargs = {name: _coerce(types[name], value, f"{prefix}{name}") for name, value in data.items()}
  return cls(**kwargs)


def _coerce(tp, value, field: str):
  if dataclasses.is_dataclass(tp):   # a config with a section names its fields by it, wherever it sits
    prefix = _prefix(tp) if hasattr(tp, "section") else field + "."
    # named here: from_dict would name a config whose section is empty (TrainConfig's) by its class
    check(isinstance(value, (Mapping, tp)) or _registry(tp) is not None, prefix.rstrip(".") or field,
          f"expected a mapping; got {value!r}")
    return from_dict(tp, value, prefix)
  origin = typing.get_origin(tp)
  if tp is bool:
    check(isinstance(value, bool), field, f"expected true or false; got {value!r}")
  elif tp is int:
    check(isinstance(value, int) and not isinstance(value, bool) or
          isinstance(value, float) and value.is_integer(), field, f"expected an integer; got {value!r}")
    return int(value)
  elif tp is float:
    check(isinstance(value, (int, float)) and not isinstance(value, bool), field, f"expected a number; got {value!r}")
    # JSON has no NaN or Infinity; Python's reader takes them, and no setting means them
    try:
      number = float(value)
    except OverflowError:   # an integer beyond any float
      number = math.inf
    check(math.isfinite(number), field, f"must be a finite number; got {value!r:.40}")
    return number
  elif tp is str:
    check(isinstance(value, str), field, f"expected a string; got {value!r}")
  elif origin in (tuple, list):
    check(isinstance(value, (list, tuple)), field, f"expected a list; got {value!r}")
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return tuple(_coerce(item, v, f"{field}[{i}]") for i, v in enumerate(value)) if item is not Any else tuple(value)
  elif origin in (dict, Mapping) or tp is dict:
    check(isinstance(value, Mapping), field, f"expected a mapping; got {value!r}")
    _, item = typing.get_args(tp) or (str, Any)
    return {str(k): (v if item is Any else _coerce(item, v, f"{field}.{k}")) for k, v in value.items()}
  return value


def to_dict(cfg, *, every: bool = False) -> dict[str, Any]:
  """Nested plain dict of a config (a registered kind carries its 'kind'); OPTIONAL fields at their
  default are left out unless `every`."""
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.metadata.get("optional") and not every and value == f.default:
      continue
    if dataclasses.is_dataclass(value):
      kind = {"kind": value.kind} if getattr(type(value), "registry", None) is not None else {}
      value = {**kind, **to_dict(value, every=every)}
    elif isinstance(value, tuple):
      value = list(value)
    out[f.name] = value
  return out


def parse_value(text: str) -> Any:
  """A command-line value: JSON when it parses (1e5, true, [1,2], {"a":1}), else the raw string."""
  try:
    return json.loads(text)
  except (json.JSONDecodeError, RecursionError):   # RecursionError: nested deeper than Python's parser goes
    return text


def override(cfg, assignments: Mapping[str, Any], *, unknown: str = "unknown field",
             parse: Callable[[Any, Any], Any] | None = None):
  """Return cfg with dotted fields replaced, e.g. {'model.position.base': 1e5, 'model.position': 'nope'}.
  `unknown` names what a bad key is in its error; parse(current value, given value), when given, is
  the value stored (command-line text typed by the field it replaces)."""
  data = to_dict(cfg, every=True)
  kinds_first = sorted(assignments.items(), key=lambda item: not _sets_kind(data, *item))
  for dotted, value in kinds_first:   # a new kind's fields are set after it resets them
    node, obj, name = data, cfg, _prefix(type(cfg))   # name: the field as from_dict's errors name it
    *path, last = dotted.split(".")
    for key in path:
      check(isinstance(node.get(key), dict), name + key, f"{unknown}; allowed: {_listed(node)}")
      node, obj = node[key], getattr(obj, key, None)
      name = _prefix(type(obj)) if hasattr(type(obj), "section") else f"{name}{key}."
    check(last in node, name + last, f"{unknown}; allowed: {_listed(node)}")
    new = value if parse is None else parse(node[last], value)
    if last == "kind" and new != node["kind"]:   # another kind: its own fields, at their defaults
      node.clear()
      node.update(_defaults(obj, new))
    elif isinstance(new, str) and isinstance(node[last], dict) and "kind" in node[last]:
      # a polymorphic field given by its kind ('model.position=nope') is that kind at its defaults, as
      # a dict, so that its fields given beside it are set on it or named in the error
      new = {**_defaults(getattr(obj, last, None), new), "kind": new}
    node[last] = new
  return from_dict(type(cfg), data)


def _sets_kind(data: dict, dotted: str, value) -> bool:
  """Whether the assignment chooses a kind: 'x.kind', or a kind's name given to a polymorphic field 'x'."""
  *path, last = dotted.split(".")
  if last == "kind":
    return True
  for key in path:
    data = data.get(key) if isinstance(data, dict) else None
  return isinstance(value, str) and isinstance(data, dict) and isinstance(data.get(last), dict) \
      and "kind" in data[last]


def _defaults(cfg, kind) -> dict:
  """The dict form of `kind`'s defaults, a kind of the registry `cfg`'s class belongs to ({} if unknown:
  from_dict then names the kind)."""
  registry = next((_registry(c) for c in type(cfg).__mro__ if _registry(c) is not None), {})
  return to_dict(registry[kind](), every=True) if kind in registry else {}


def _listed(names) -> str:
  return ", ".join(sorted(names)) or "none"
