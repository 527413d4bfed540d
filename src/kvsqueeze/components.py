"""What every recipe component (scorer, budget, quantizer) has: a name, a paper, options."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
RANGE = "range"
"""Key of an option's ``OptionRange`` in its dataclass field's metadata."""


@dataclass(frozen=True)
class OptionRange:
    """The values a component option accepts.

    Whatever the range, a float option must be finite and an int option fit in 32 bits: options
    end up in tensor arithmetic, where NaN and infinities spread and int64 sums can overflow.

    Parameters
    ----------
    minimum, maximum : inclusive bounds (None = unbounded).
    choices : the only values accepted (empty = any within the bounds).
    odd : only odd values are accepted.
    """

    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    odd: bool = False

    def check(self, value: Any, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` (``snapkv:window``) if ``value`` is out of range."""
        kind = _unrepresentable(value)
        if kind or not self._within(value):
            requirement = " ".join(filter(None, (kind, str(self))))
            raise ValueError(f"{where} must be {requirement}, got {value!r}")

    def _within(self, value: Any) -> bool:
        return not (
            (self.choices and value not in self.choices)
            or (self.odd and value % 2 != 1)
            or (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
        )

    def __str__(self) -> str:
        """``>= 1``, ``in [0, 1]``, ``one of 2, 4, 8``, ``odd and >= 1``; empty if unbounded."""
        parts = ["odd"] if self.odd else []
        if self.choices:
            parts.append("one of " + ", ".join(str(choice) for choice in self.choices))
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"in [{self.minimum}, {self.maximum}]")
        elif self.minimum is not None:
            parts.append(f">= {self.minimum}")
        elif self.maximum is not None:
            parts.append(f"<= {self.maximum}")
        return " and ".join(parts)


def _unrepresentable(value: Any) -> str:
    """``a finite number`` or ``a 32-bit int`` when ``value`` should be one and is not, else ``""``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(value, int) and not -(2**31) <= value < 2**31:
        return "a 32-bit int"
    return ""


def option(
    default: T,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple = (),
    odd: bool = False,
) -> T:
    """A component option with its valid range, as a dataclass field default:
    ``window: int = option(32, minimum=1)``. Bool and str options need no bounds."""
    allowed = OptionRange(minimum, maximum, tuple(choices), odd)
    return dataclasses.field(default=default, metadata={RANGE: allowed})


class Component:
    """Base of scorers, budgets and quantizers: dataclass fields are the component's options.

    Options are declared with ``option`` and checked against their range on construction
    (``ValueError`` naming the option). A subclass with its own ``__post_init__`` calls this one.
    """

    name: str = ""
    citation: str = ""
    kind: str = ""

    def __post_init__(self) -> None:
        for key, allowed in self.ranges().items():
            allowed.check(getattr(self, key), f"{self.name}:{key}")

    @classmethod
    def ranges(cls) -> dict[str, OptionRange]:
        """The declared range of each option (options declared without ``option`` are left out)."""
        if not dataclasses.is_dataclass(cls):
            return {}
        return {f.name: f.metadata[RANGE] for f in dataclasses.fields(cls) if RANGE in f.metadata}

    def options(self) -> dict:
        """The component's tunable options and their current values."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def spec(self) -> str:
        """``name`` or ``name:opt=value,...`` listing only options that differ from the defaults."""
        defaults = type(self)().options()
        changed = [f"{key}={value}" for key, value in self.options().items() if defaults[key] != value]
        return self.name + (":" + ",".join(changed) if changed else "")
