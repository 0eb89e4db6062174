"""pydantic's ``ValidationError`` as the project's messages: one line per problem, ``key = value:
expected ...``, naming the value as read, the allowed values and, for an unknown key, the closest
known one. :mod:`vae.config` builds its one :class:`~vae.errors.ConfigError` per file from these.

A value's problem is reported once, by its kind: a wrong type first (``expected an integer or
null``), then a value outside its choices (``expected one of adam, adagrad``), then a range
(``expected a finite number > 0``). The rules that involve several keys (the models'
``model_validator``s) collect their problems in :class:`Problems` and raise them as one pydantic
error of type :data:`CUSTOM`; they run on the values that passed their own checks, defaults
standing in for the others (:func:`section_problems`).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from vae.errors import ConfigError

CUSTOM = "config"  # the type of the pydantic errors the models' own rules raise
INTEGER_LIMIT = 2**63  # every integer parameter must fit in 64 bits (torch's and numpy's integers)


def custom(text: str) -> PydanticCustomError:
    """A problem a validator of one value found (``text``: what was expected)."""
    return PydanticCustomError(CUSTOM, text)


def integer_text(value: int) -> str:
    """``repr(value)``, or its size in digits beyond 128 bits (Python refuses to print an integer
    of over 4300 digits; no message may depend on it)."""
    if value.bit_length() <= 128:
        return repr(value)
    return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"


def shown(value: Any) -> str:
    """A value as messages show it: its repr, never failing."""
    if isinstance(value, int) and not isinstance(value, bool):
        return integer_text(value)
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to print>"


def key_text(key: Any) -> str:
    """A key as messages name it: a printable name as it is, else (empty, blank at either end,
    a line break, not a string) its repr, on one line."""
    if isinstance(key, str) and key and key.isprintable() and key == key.strip():
        return key
    return shown(key) if isinstance(key, int) and not isinstance(key, bool) else shown(key).replace("\n", "\\n")


def unknown(key: Any, known: list[str], kind: str = "key") -> str:
    """``key: unknown key (did you mean 'epochs'?); allowed keys: ...`` (``kind``: key or section)."""
    if not isinstance(key, str):  # YAML reads a key written 1, null or true as int, None, bool
        return (f"{key_text(key)}: unknown {kind}, not a name ({type(key).__name__}); "
                f"allowed {kind}s: {', '.join(known)}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key_text(key)}: unknown {kind}{hint}; allowed {kind}s: {', '.join(known)}"


def _unwrap(annotation: Any) -> Any:
    return _unwrap(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is Annotated else annotation


def type_name(annotation: Any) -> str:
    """What a field's type expects, in words: ``an integer or null``, ``a list of numbers``."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "a string"
    if annotation is dict or origin is dict:
        value_type = (typing.get_args(annotation) or (str, Any))[1]
        inner = "values" if value_type is Any else "mappings" if _unwrap(value_type) is dict else \
            type_name(value_type).removeprefix("an ").removeprefix("a ").replace("list", "lists", 1)
        return f"a mapping of names to {inner}"
    if origin is list:
        return f"a list of {type_name(typing.get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    return {type(None): "null", int: "an integer", float: "a number", str: "a string",
            bool: "true or false"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bound(annotation: Any, metadata: list) -> str:
    """``> 0``, ``>= 0`` or ``> 0 and < 1``: the numeric constraints in a field's metadata or nested
    annotations (the lower bound first)."""
    stack = [annotation, *metadata]
    lower = upper = None
    while stack:
        item = stack.pop()
        if isinstance(item, annotated_types.Gt):
            lower = lower or f"> {item.gt}"
        elif isinstance(item, annotated_types.Ge):
            lower = lower or f">= {item.ge}"
        elif isinstance(item, annotated_types.Lt):
            upper = upper or f"< {item.lt}"
        elif isinstance(item, annotated_types.Le):
            upper = upper or f"<= {item.le}"
        if hasattr(item, "metadata") and isinstance(item.metadata, list):  # FieldInfo inside Annotated
            stack.extend(item.metadata)
        stack.extend(getattr(item, "__metadata__", ()))
        stack.extend(typing.get_args(item))
    return " and ".join(part for part in (lower or "> 0", upper) if part)


def _accepts_float(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_float(arg) for arg in typing.get_args(annotation))
    return annotation is float


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short",
                CUSTOM}


def field_problem(cls: type[BaseModel], name: str, value: Any, errors: list[dict]) -> str:
    """One line for a field whose value failed: its type first, then its choices, then its range."""
    field = cls.model_fields[name]
    if _accepts_float(field.annotation) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # shown as the number it was read as
            value = float(value)
        except (ValueError, OverflowError):
            pass
    head = f"{name} = {shown(value)}: "
    kinds = ["choice" if e["type"] == "literal_error" and isinstance(e["input"], str) else
             "range" if e["type"] in RANGE_ERRORS else "type" for e in errors]
    if "type" in kinds:
        return head + f"expected {type_name(field.annotation)}"
    if "choice" in kinds:
        choices = next(typing.get_args(arg) for arg in _literals(field.annotation))
        if typing.get_origin(_unwrap(field.annotation)) is list:
            bad = [value[e["loc"][1]] for e in errors if len(e["loc"]) > 1]
            return head + f"unknown {', '.join(map(repr, bad))}; expected values from {', '.join(choices)}"
        return head + f"expected one of {', '.join(choices)}"
    error = errors[0]
    if error["type"] == "too_short":
        return head + "expected a non-empty list"
    if error["type"] == CUSTOM:
        return head + error["msg"]
    bound = _bound(field.annotation, field.metadata)
    if len(error["loc"]) > 1:  # an item of a list
        items = "integers" if "integer" in type_name(field.annotation) else "finite numbers"
        return head + f"expected a list of {items} {bound}"
    return head + f"expected a finite number {bound}"


def _literals(annotation: Any) -> list:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is Literal:
        return [annotation]
    return [found for arg in typing.get_args(annotation) for found in _literals(arg)]


def section_problems(cls: type[BaseModel], raw: dict) -> tuple[BaseModel | None, list[str]]:
    """The validated section, or None and its problems (``key = value: ...``, without the section):
    unknown keys, then each bad value, then the cross-field rules on the good values (defaults
    standing in for the bad ones)."""
    fields = list(cls.model_fields)
    problems = [unknown(key, fields) for key in raw if key not in cls.model_fields]
    known = {key: value for key, value in raw.items() if key in cls.model_fields}
    try:
        instance = cls.model_validate(known)
        return (None, problems) if problems else (instance, [])
    except ValidationError as error:
        errors = error.errors()
    bad: dict[str, list[dict]] = {}
    cross: list[str] = []
    for e in errors:
        if e["loc"]:
            bad.setdefault(str(e["loc"][0]), []).append(e)
        else:
            cross.extend(e["ctx"]["problems"] if e["type"] == CUSTOM else [f"{cls.__name__}: {e['msg']}"])
    problems += [field_problem(cls, name, known[name], bad[name]) for name in known if name in bad]
    if bad:
        try:  # the cross-field rules, on the values that passed their own checks
            cls.model_validate({k: v for k, v in known.items() if k not in bad}, context={"invalid": set(bad)})
        except ValidationError as error:
            cross = [line for e in error.errors() if e["type"] == CUSTOM for line in e["ctx"]["problems"]]
    return None, problems + cross


def oversized_integers(raw: Any) -> list[str]:
    """One problem per integer of more than 64 bits anywhere in ``raw`` (values, list items, keys),
    named by its path: torch and numpy take no larger integer, and one of over 4300 digits cannot
    even be printed in a message."""
    problems: list[str] = []
    stack: list[tuple[str, Any]] = [("", raw)]
    seen: set[int] = set()  # YAML anchors can make a list that contains itself
    while stack:
        where, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INTEGER_LIMIT <= value < INTEGER_LIMIT:
                problems.append(f"{where or 'the file'} = {integer_text(value)}: expected an integer "
                                "from -2**63 to 2**63 - 1")
            continue
        if not isinstance(value, (dict, list, tuple, set, frozenset)) or id(value) in seen:
            continue
        seen.add(id(value))
        children = []
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key_text(key)}" if where else key_text(key)
                children += [(f"{name} (the key)", key), (name, item)]
        else:
            children = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        stack.extend(reversed(children))
    return problems


def invalid(source: str, problems: list[str]) -> ConfigError:
    """The one error for ``source``: ``<source>: invalid parameters:`` and a line per problem."""
    return ConfigError(f"{source}: invalid parameters:\n" + "\n".join(f"  {problem}" for problem in problems))


class Problems:
    """The cross-field problems of a section, each ``key = value: what is wrong``. A rule whose
    fields failed their own checks does not run (``info.context["invalid"]``: defaults stand in
    for those, and a second message about them would mislead)."""

    def __init__(self, model: BaseModel, info: ValidationInfo) -> None:
        self.model, self.lines = model, []
        self.invalid = set((info.context or {}).get("invalid", ()))

    def valid(self, *names: str) -> bool:
        """Whether the fields ``names`` passed their own checks (a rule on them may run)."""
        return not self.invalid.intersection(names)

    def add(self, name: str, text: str, as_text: str | None = None) -> None:
        """Add ``name = <its value, or as_text>: text``."""
        self.lines.append(f"{name} = {shown(getattr(self.model, name)) if as_text is None else as_text}: {text}")

    def done(self) -> Any:
        """The model, or (any problem added) one pydantic error of type :data:`CUSTOM` listing them."""
        if self.lines:
            raise PydanticCustomError(CUSTOM, "{summary}", {"summary": "; ".join(self.lines),
                                                            "problems": tuple(self.lines)})
        return self.model
