"""`opt`: a documented dataclass field, shared by the stage configs (config.py) and the knobs that
an algorithm declares next to its function in algo/ (a loss's own options), so both are typed,
documented, range-checked and listed in `--help` the same way."""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, factory: Any = None,
        unknown: str = "", sets: dict[str, str] | None = None) -> Any:
    """A documented config field. `min`/`max` are inclusive bounds; `choices` lists legal values;
    `unknown` (on a nested config) says what the stage does instead of a key the nested config lacks;
    `sets` (on a stage nested in the pipeline) maps its keys that the pipeline fills in to the value."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "unknown": unknown, "sets": sets or {}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
