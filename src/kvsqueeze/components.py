"""What every recipe component (scorer, budget, quantizer) has: a name, a paper, options."""

from __future__ import annotations

import dataclasses


class Component:
    """Base of scorers, budgets and quantizers: dataclass fields are the component's options."""

    name: str = ""
    citation: str = ""
    kind: str = ""

    def options(self) -> dict:
        """The component's tunable options and their current values."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def spec(self) -> str:
        """``name`` or ``name:opt=value,...`` listing only options that differ from the defaults."""
        defaults = type(self)().options()
        changed = [f"{key}={value}" for key, value in self.options().items() if defaults[key] != value]
        return self.name + (":" + ",".join(changed) if changed else "")
