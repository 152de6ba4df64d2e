"""The shipped recipes (one TOML file each) and the functions that read a recipe, apply --set
overrides to it and write the resolved config back as TOML."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from cifar_transfer.config import (
    FIELD_TYPES,
    SECTIONS,
    Config,
    coerce,
    config_from_dict,
    valid_keys,
    validate,
)
from cifar_transfer.system.errors import UserError


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (what config.toml holds)."""
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text."""
    return tomli_w.dumps(to_dict(cfg))


def recipe_names() -> list[str]:
    """Names of the recipes shipped in the package."""
    folder = resources.files("cifar_transfer") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Config:
    """Load a shipped recipe by name, or a recipe/config TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {name_or_path} not found: give a path to a .toml file")
        text, name = path.read_text(), path.stem
    else:
        res = resources.files("cifar_transfer") / "recipes" / f"{name_or_path}.toml"
        if not res.is_file():
            raise UserError(
                f"unknown recipe {name_or_path!r}: choose one of {', '.join(recipe_names())}"
                " (cifar-transfer recipes lists them) or give a .toml path"
            )
        text, name = res.read_text(), name_or_path
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {name_or_path} is not valid TOML ({e}): fix the file") from None
    raw.setdefault("recipe", name)
    return config_from_dict(raw, recipe=name)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply KEY=VALUE overrides (e.g. model.backbone=resnet18, phases.0.epochs=2, phases.*.lr=0.1)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"bad --set {item!r}: write KEY=VALUE, e.g. --set phases.0.epochs=2")
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in SECTIONS:
            section = getattr(cfg, parts[0])
            targets, fname = [section], parts[1]
        elif len(parts) == 3 and parts[0] == "phases":
            fname = parts[2]
            if parts[1] == "*":
                targets = list(cfg.phases)
            elif parts[1].isdigit() and int(parts[1]) < len(cfg.phases):
                targets = [cfg.phases[int(parts[1])]]
            else:
                named = [p for p in cfg.phases if p.name == parts[1]]
                if not named:
                    raise UserError(
                        f"unknown phase {parts[1]!r} in --set {key}: this recipe has phases "
                        + ", ".join(f"{i} ({p.name})" for i, p in enumerate(cfg.phases))
                    )
                targets = named
        else:
            targets, fname = [], ""
        types = {f.name: f.type for f in fields(targets[0])} if targets else {}
        if fname not in types:
            raise UserError(
                f"unknown config key {key!r}: valid keys are " + ", ".join(valid_keys())
            )
        for t in targets:
            setattr(t, fname, coerce(value, FIELD_TYPES[types[fname]], key))
    validate(cfg)
    return cfg
