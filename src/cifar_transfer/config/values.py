"""A config value as TOML or `--set` gives it, turned into its field's type (or one UserError
line naming the key): the field types' markers and their parsing."""

from __future__ import annotations

import math
from typing import Any

from cifar_transfer.config.augment import augment_ops
from cifar_transfer.system.errors import UserError

LR_FIND = "find"  # phases.N.lr = "find": an LR range test on the run's data picks it (lr_find.py)


def _a(noun: str) -> str:
    """The noun with its indefinite article: "an int", "a float"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def coerce(value: Any, typ: type, key: str) -> Any:
    """Turn a TOML value or a --set string into the field's type, or fail naming the key."""
    out = _convert(value, typ, key)
    # One rule for every float: inf/nan pass range checks written as `x >= 0` (inf warmup epochs
    # overflow the schedule, an inf L2 penalty gives a NaN probe) or fail them with a puzzling line.
    if typ in (float, Number, LearningRate) and out != LR_FIND and not math.isfinite(out):
        raise UserError(f"bad value for {key}: {value!r} is not a finite number")
    return out


def _convert(value: Any, typ: type, key: str) -> Any:
    """The type conversion behind coerce."""
    if typ is Augments:
        return augment_ops(value, key)
    if typ is LearningRate:
        if isinstance(value, str) and value.strip().lower() == LR_FIND:
            return LR_FIND
        try:
            return _convert(value, float, key)
        except UserError:
            raise UserError(f"bad value for {key}: {value!r} is not a number > 0 or \"find\" "
                            f"(an LR range test on the run's data)") from None
    if typ is Number:  # a whole number stays an int (a count), anything else is a float
        text = value.strip() if isinstance(value, str) else value
        number = _convert(text, float, key)
        return int(number) if float(number).is_integer() else number
    if typ is list:  # list[float]: a TOML array, or "1e-3,1e-4" on the command line
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise UserError(f"bad value for {key}: {value!r} is not a list of numbers such as 1e-3,1e-4")
        return [coerce(v, float, key) for v in items]
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        try:
            if typ is bool:
                if text in ("true", "1", "yes", "on"):
                    return True
                if text in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return typ(value)
        except ValueError:
            raise UserError(f"bad value for {key}: {value!r} is not {_a(typ.__name__)}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise UserError(f"bad value for {key}: {value!r} is not true/false")
    if typ in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"bad value for {key}: {value!r} is not {_a(typ.__name__)}")
    if typ is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"bad value for {key}: {value!r} is not a whole number")
        return int(value)
    if typ is str and not isinstance(value, str):
        raise UserError(f"bad value for {key}: {value!r} is not a string")
    return value


class Number(float):
    """Marks a field that takes a count (int) or a fraction (float), e.g. data.val_size."""


class LearningRate(float):
    """Marks phases.N.lr: a number > 0, or "find"."""


class Augments(list):  # marks phases.N.augment: a list of augmentation ops (augment_ops parses it)
    pass


FIELD_TYPES = {
    "int": int, "float": float, "str": str, "bool": bool, "list[float]": list, "int | float": Number,
    "list[str]": Augments, "float | str": LearningRate,
}
