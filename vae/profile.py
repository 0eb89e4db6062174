"""Named configurations (profiles): the paper set-ups a user picks without editing code.

A profile is a YAML file in ``vae/profiles/`` with a ``description`` and ``params``: the values
that differ from the defaults of :mod:`vae.config` (the ``quick`` profile, what ``params.yaml``
holds as committed), put on top of them by :func:`vae.config.overlay`. ``vae profile NAME``
rewrites ``params.yaml`` as defaults + the profile's values, keeping the file's comments, so that
``dvc repro`` (or ``dvc exp run``) runs that set-up and ``dvc params diff`` shows what it changed;
``-S key=value`` overrides still apply on top (``dvc exp run -S train.training_samples=3000000``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vae.config import SECTIONS, Params, overlay, params_from_dict, parse_yaml, read_params_text
from vae.errors import ConfigError
from vae.io import write_text

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Profile:
    """One named configuration: its name, what it reproduces, and its parameter overrides."""

    name: str
    description: str
    overrides: dict[str, dict[str, Any]]

    def params(self) -> Params:
        """The full, validated parameters: the defaults with this profile's values on top.

        Raises:
            ConfigError: the profile sets an unknown key or a bad value (names the file).
        """
        source = f"{PROFILE_DIR / self.name}.yaml"
        if "profile" in self.overrides:  # the file's name is the profile's
            raise ConfigError(f"{source}: params.profile: expected a section ({', '.join(SECTIONS)}) mapping keys "
                              "to values")
        return overlay(Params(), {**self.overrides, "profile": self.name}, source=source)


def available() -> list[str]:
    """Names of the profiles shipped with the project, sorted."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """Read ``vae/profiles/<name>.yaml``.

    Raises:
        ConfigError: no such profile (lists the available ones) or a malformed file.
    """
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {name!r}: unknown; available profiles: {', '.join(available())}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("params", {}), dict) \
            or not isinstance(raw.get("description"), str):
        raise ConfigError(f"{path}: expected a mapping with 'description' (text) and 'params' (sections)")
    return Profile(name=name, description=" ".join(raw["description"].split()),
                   overrides=raw.get("params") or {})


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}``, nested mappings (the sweep's settings) down to their leaves."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(block: Any, values: dict[str, Any]) -> None:
    """Make the ruamel mapping ``block`` hold ``values``: keys it lacks added, keys beyond removed,
    nested mappings merged in place (so their comments and flow style stay), lists in flow style."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    for key in [k for k in block if k not in values]:
        del block[key]
    for key, value in values.items():
        if isinstance(value, dict):
            if not isinstance(block.get(key), CommentedMap):
                block[key] = CommentedMap()
                if not any(isinstance(v, dict) for v in value.values()):
                    block[key].fa.set_flow_style()
            _merge(block[key], value)
            continue
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        if key not in block or block[key] != value:
            block[key] = value


def render(params: Params, template: str | None) -> str:
    """``params`` as YAML text, keeping the comments and layout of ``template`` (an existing
    ``params.yaml``) where it has them; keys ``template`` lacks are added, keys it has beyond
    ``params`` are dropped."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    writer = YAML()  # round-trip: comments survive
    writer.width = 120
    writer.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = writer.load(template) if template else None
    if not isinstance(document, CommentedMap):
        document = CommentedMap()
    target = params.to_dict()
    for key in [k for k in document if k not in target]:
        del document[key]
    for section, values in target.items():
        if not isinstance(values, dict):
            document[section] = values
            continue
        if not isinstance(document.get(section), CommentedMap):
            document[section] = CommentedMap()
        _merge(document[section], values)
    out = io.StringIO()
    writer.dump(document, out)
    return out.getvalue()


def apply(name: str, path: str | Path = "params.yaml") -> dict[str, tuple[Any, Any]]:
    """Rewrite ``path`` as profile ``name`` (atomically, comments kept).

    Returns:
        ``{"section.key": (old value, new value)}`` for every value that changed.

    Raises:
        ConfigError: unknown or malformed profile, or ``path`` is unreadable, not UTF-8 or not
            valid YAML.
    """
    path = Path(path)
    params = load_profile(name).params()
    template = read_params_text(path) if path.is_file() else None
    try:
        old = parse_yaml(template, path) if template else {}
    except ConfigError as error:
        raise ConfigError(f"{error}; fix or delete it first") from None
    old_flat = _flat(old if isinstance(old, dict) else {})
    text = render(params, template)
    if params_from_dict(yaml.safe_load(text), str(path)) != params:  # never write what does not read back
        raise ConfigError(f"{path}: rendering profile {name!r} did not round-trip; file left unchanged")
    write_text(path, text)
    new_flat = _flat(params.to_dict())
    return {key: (old_flat.get(key), value) for key, value in new_flat.items() if old_flat.get(key) != value}
