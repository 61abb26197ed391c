"""Pass protocol and registry. One file per pass in this package; each registers itself with @register."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..errors import GraphoptError

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed pass option: default, allowed values or range, and a one-line doc."""
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        if self.choices:
            allowed = "|".join(_fmt(c) for c in self.choices)
        elif self.min is not None or self.max is not None:
            lo = "" if self.min is None else _fmt(self.min)
            hi = "" if self.max is None else _fmt(self.max)
            allowed = f"{self.type.__name__} in [{lo}, {hi}]"
        else:
            allowed = self.type.__name__
        return allowed

    def parse(self, where: str, raw: Any) -> Any:
        try:
            if self.type is bool:
                value = raw if isinstance(raw, bool) else _BOOL_WORDS[str(raw).strip().lower()]
            elif self.type is int:
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                value = int(raw) if not isinstance(raw, str) else int(raw.strip(), 0)
            elif self.type is float:
                value = float(raw)
            else:
                value = self.type(raw)
        except (KeyError, ValueError, TypeError):
            raise GraphoptError(f"{where}: '{raw}' is not a valid {self.type.__name__}; allowed: {self.describe()}")
        if self.choices and value not in self.choices:
            raise GraphoptError(f"{where}: '{raw}' is not allowed; choose one of {self.describe()}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise GraphoptError(f"{where}: {raw} is out of range; allowed: {self.describe()}")
        return value


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


class Pass:
    """Base class: subclasses set the class attributes and implement `run`.

    run(program, ctx) returns (new_program, details): the pass builds new ExportedPrograms rather than editing the
    input program (see compiler.graph_edit), and `details` is a JSON-able dict merged into the pass report.
    """
    name: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    needs: ClassVar[frozenset[str]] = frozenset()      # e.g. {"calibration"}
    tasks: ClassVar[frozenset[str] | None] = None       # plan kinds it applies to; None = any
    exact: ClassVar[bool] = True
    metric: ClassVar[str] = "max_rel"                   # see compiler.guard.METRICS
    tolerance: ClassVar[float] = 1e-5
    adds_outputs: ClassVar[bool] = False               # appends outputs to methods (the guard compares the rest)
    needs_methods: ClassVar[frozenset[str]] = frozenset()  # optional methods capture must export (e.g. {"verify"})
    half_precision: ClassVar[bool] = False               # also runs on bfloat16/float16 programs (--dtype)

    def __init__(self, **config: Any):
        self.config = config

    def run(self, program, ctx):  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def methods_needed(cls, config: dict[str, Any]) -> frozenset[str]:
        """Optional methods capture must export for this configuration."""
        return cls.needs_methods

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str) -> None:
        """Checks across options, run when the pipeline is parsed (before any expensive work)."""

    @classmethod
    def tolerance_text(cls) -> str:
        """The guard's limit, as --list-passes shows it."""
        return f"{cls.metric} <= {cls.tolerance:g}"

    @classmethod
    def headline(cls, details: dict[str, Any]) -> str:
        """What the run changed, in a few words, for the CLI's summary table ("" when nothing to say)."""
        return ""

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


_discovered = False


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import importlib
    import pkgutil
    from .. import passes
    for info in pkgutil.iter_modules(passes.__path__):
        if info.name != "base":
            importlib.import_module(f"{passes.__name__}.{info.name}")
    _discovered = True
