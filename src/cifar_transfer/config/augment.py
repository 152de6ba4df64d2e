"""The grammar of phases.N.augment: a list of ops, each a name and maybe a range ("rrc:0.35-1",
"jpeg:50-95"), checked here so a bad name or range is one line naming the key. data/augment.py
runs them; docs/guides/augmentation.md describes them."""

from __future__ import annotations

import math
import re
from typing import Any

from cifar_transfer.system.errors import UserError

# phases.N.augment's ops (data/augment.py runs them in order): name -> default "LO-HI", or None
# for an op without a range. Guide: docs/guides/augmentation.md.
AUGMENT_OPS = {"flip": None, "crop": None, "rrc": "0.08-1", "trivial": None, "randaugment": "2-9",
               "jpeg": "50-95"}
# The ops a cached partial phase (phases.N.cache_frozen) runs on stored maps, not on pixels.
MAP_OPS = ("flip", "crop")


# "op:A-B" -> (its form, the test A and B pass, whole numbers only)
_AUGMENT_LIMITS = {"rrc": ("rrc:LO-HI with 0 < LO <= HI <= 1", lambda a, b: 0 < a <= b <= 1, False),
                   "randaugment": ("randaugment:N-M with 1 <= N <= 10 ops, magnitude 0 <= M <= 30",
                                   lambda a, b: 1 <= a <= 10 and 0 <= b <= 30, True),
                   "jpeg": (("jpeg:LO-HI[:P] with whole numbers 1 <= LO <= HI <= 100 and 0 < P <= 1 (the "
                             "share of images re-compressed; 1 when left out)"), lambda a, b: 1 <= a <= b <= 100, True)}
# Ops that take ":P" after their range: the probability each image gets the op (default 1).
_PROB_OPS = ("jpeg",)


def augment_ops(value: Any, key: str = "augment") -> list[str]:
    """phases.N.augment as its ops in order ("none" = [], "crop-flip" = crop, flip), or one UserError."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise UserError(f"bad value for {key}: {value!r} is not a list such as [\"rrc\", \"flip\"]")
    ops: list[str] = []
    for item in (v.strip().lower() for v in items):
        if item not in ("none", "", "crop-flip"):
            augment_op(item, key)
        ops += ["crop", "flip"] if item == "crop-flip" else [item] if item not in ("none", "") else []
    return ops


def augment_op(item: str, key: str = "augment") -> tuple[str, tuple[float, ...] | None]:
    """One op's name and its (LO, HI) range (the default where it takes one; jpeg: (LO, HI, P)),
    or one UserError."""
    name, sep, arg = item.partition(":")
    if name not in AUGMENT_OPS or (sep and AUGMENT_OPS[name] is None):
        ops = ", ".join(n if r is None else f"{n}[:{r}]" for n, r in AUGMENT_OPS.items())
        raise UserError(f"bad value for {key}: {item!r} is not an augmentation: choose from none, {ops}")
    default = AUGMENT_OPS[name]
    if default is None:
        return name, None
    form, ok, whole = _AUGMENT_LIMITS[name]
    number = r"\d+" if whole else r"\d*\.?\d+"
    prob = r"(?::(\d*\.?\d+))?" if name in _PROB_OPS else "()"  # group 3: P, or empty
    match = re.fullmatch(rf"({number})-({number}){prob}", arg if sep else default)
    lo, hi, p = (math.nan, math.nan, None) if not match else (
        float(match[1]), float(match[2]), float(match[3]) if match[3] else None)
    if not ok(lo, hi) or (p is not None and not 0 < p <= 1):
        whole_note = " (whole numbers)" if whole and "whole" not in form else ""
        raise UserError(f"bad value for {key}: {item!r}: write {form}{whole_note}, e.g. {name}:{default}")
    return name, (lo, hi) + ((1.0 if p is None else p,) if name in _PROB_OPS else ())
