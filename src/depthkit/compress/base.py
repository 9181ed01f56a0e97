"""The compression-method registry and what every depth-compression method shares.

A method is one file in `depthkit/compress/methods/` that defines a subclass of
`CompressionMethod` decorated with `@register_method("name")` (a second method of the same name is
an error); `depthkit.compress` imports them all once this module is complete, so nothing here
imports the methods (no import circle). It reads the model through a block source (in memory or
streamed from disk, `depthkit.models.runner`) with calibration token blocks and how many blocks to
remove, and is written as two halves: `search` chooses what to remove or merge and returns it as a
`CompressionPlan` (`compress/plan.py`, reusable and saved as JSON), `apply` performs that plan,
writing the new blocks to a sink (the model in memory, or a new checkpoint), and returns what it
did (`CompressionOutcome`), which becomes the compression card.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from depthkit.compress.plan import CompressionPlan
from depthkit.errors import DepthkitError, require
from depthkit.models.runner import BlockSink, BlockSource, InMemoryModel, ModelSink

METHODS: dict[str, type[CompressionMethod]] = {}


def option(default: Any, help: str) -> Any:
    """A method option: a dataclass field with its one-line help (`depthkit compress --list`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class MethodOptions:
    """The options of a method as a typed dataclass: one `option(default, help)` field each.

    Subclass it per method. `from_dict` refuses unknown names and converts what a command line
    gives (`--option ridge=1e-2` arrives as text or a number) to each field's type, so a typo or an
    unreadable value fails before any model is loaded; `validate` checks ranges.
    """

    batch_size: int = option(8, "calibration sequences per forward (default 8)")

    @classmethod
    def from_dict(cls, options: dict[str, Any], method: str = "") -> MethodOptions:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        require(not unknown, f"method '{method}' has no option {', '.join(unknown)}; "
                             f"its options: {', '.join(sorted(known))}")
        values = {name: _convert(method, name, value, known[name].default) for name, value in options.items()}
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def _convert(method: str, name: str, value: Any, default: Any) -> Any:
    """`value` as the type of the option's default; JSON text for list options."""
    try:
        if isinstance(value, str) and (default is None or isinstance(default, list)) and value.lstrip()[:1] == "[":
            return json.loads(value)
        if isinstance(default, bool) and isinstance(value, str):
            require(value.lower() in ("true", "false"), f"{method} option {name}: expected true or false")
            return value.lower() == "true"
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            converted = type(default)(value)
            require(not isinstance(default, int) or converted == float(value),
                    f"{method} option {name} must be a whole number, got {value!r}")
            require(math.isfinite(converted), f"{method} option {name} must be a finite number, got {value!r}")
            return converted
    except (TypeError, ValueError, OverflowError):
        raise DepthkitError(f"{method} option {name}: cannot read {value!r}") from None
    return value


@dataclass
class CompressionOutcome:
    """What a method did: removed/merged blocks and method-specific details for the card."""

    details: dict[str, Any] = field(default_factory=dict)
    # False for results that are not plain standard checkpoints (e.g. unpruned double-width blocks).
    saveable: bool = True


class CompressionMethod:
    """Base class: subclasses set `name`, `description`, `options_class` and implement `search` and `apply`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The publication the method follows ("" for depthkit's own); the card names it.
    paper: ClassVar[str] = ""
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    # False for methods whose result is never a standard checkpoint, so `--out` is refused up front.
    produces_checkpoint: ClassVar[bool] = True
    # Options only `apply` reads (a least-squares fit, how much of a ranking to take): a saved plan may
    # be applied with other values of these. Every other option shaped the search, so a plan refuses
    # another value of it (`method_for_plan`).
    apply_options: ClassVar[frozenset[str]] = frozenset()
    # The method whose search this one shares (its plans apply here too); None: its own.
    plan_method: ClassVar[str | None] = None
    # What every step of its plans must say (`CompressionPlan` types the keys the methods share).
    step_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self.options = options  # as given: what the compression card records
        self.settings = self.options_class.from_dict(options, self.name)

    @classmethod
    def option_help(cls) -> dict[str, str]:
        return cls.options_class.help()

    def deviations(self) -> list[str]:
        """How this run differs from the paper and its authors' code, one sentence each: the card
        lists them so a baseline is never weaker than published without saying so."""
        return []

    @property
    def refits_weights(self) -> bool:
        """Whether weights are refit to the calibration text (least squares): what such a method
        fits follows that text, so a calibration from one corpus is warned about (measured in
        benchmarks/results/domains_single.md)."""
        return False

    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        """Compress `model` in memory: the blocks the method writes become its blocks. (A saved plan
        is applied through `depthkit.compress(..., plan=...)`, which checks it first.)"""
        with ModelSink(model) as sink:
            return self.compress_blocks(InMemoryModel(model), calib_ids, num_remove, sink)

    def compress_blocks(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """The method on either backend: `apply(search(...))`."""
        return self.apply(source, self.search(source, calib_ids, num_remove), calib_ids, num_remove, sink)

    @classmethod
    def planned_as(cls) -> str:
        """The method name its plans carry."""
        return cls.plan_method or cls.name

    def check_plan(self, plan: CompressionPlan, num_layers: int, num_remove: int) -> None:
        """Refuse a plan of another method or model depth, or one that cannot serve `num_remove`
        exactly: known from the model's config, so checked before any weight is loaded."""
        require(plan.method == self.planned_as(), f"the plan was searched by {plan.method}, not {self.name}")
        missing = sorted({key for step in plan.steps for key in self.step_keys if key not in step})
        require(not missing, f"the steps of a {plan.method} plan give {', '.join(self.step_keys)}; "
                             f"this plan's lack {', '.join(missing)}")
        plan.check_model(num_layers)
        plan.check_count(num_remove)

    def search(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int
    ) -> CompressionPlan:  # pragma: no cover - interface
        """Choose what to remove or merge for `num_remove` blocks, reading the model through `source`
        (in memory, or streamed from disk one block at a time); nothing is written."""
        raise NotImplementedError

    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:  # pragma: no cover - interface
        """Perform `plan` for `num_remove` blocks (it refuses a count it cannot serve exactly), writing
        the new blocks to `sink` in order; `calib_ids` for methods that fit weights as they go."""
        raise NotImplementedError

    def new_plan(
        self, source: BlockSource, num_remove: int, reuse: str, steps: list[dict[str, Any]],
        details: dict[str, Any] | None = None, reuse_reason: str = "",
    ) -> CompressionPlan:
        """A plan of this method, with its options, for `source`'s depth (the caller names the model)."""
        return CompressionPlan(method=self.planned_as(), options=dict(self.options), model="",
                               num_layers=len(source.layers()), num_remove=num_remove, reuse=reuse, steps=steps,
                               details=details or {}, reuse_reason=reuse_reason)

    def check_depth(self, num_layers: int, num_remove: int) -> None:
        """Options that depend on the model's depth, checked from its config before any weight is
        loaded (a method with none keeps this)."""

    def require_streaming(self) -> None:
        """Refuse `--offload disk` (before any work) for methods that need the whole model in memory."""
        require(self.streams(), f"method '{self.name}' needs the whole model in memory; `offload` disk works with: "
                                + ", ".join(streaming_methods()))

    @classmethod
    def streams(cls) -> bool:
        """Methods written against a source and a sink whose result is a standard checkpoint."""
        return cls.produces_checkpoint and cls.apply is not CompressionMethod.apply


def register_method(name: str):
    """Class decorator: make a `CompressionMethod` available by `name`."""

    def decorator(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        if name in METHODS:
            raise DepthkitError(f"two compression methods are registered as '{name}': "
                                f"{METHODS[name].__module__} and {cls.__module__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def streaming_methods() -> list[str]:
    """Registered methods that can compress a checkpoint streamed from disk."""
    return sorted(name for name, cls in METHODS.items() if cls.streams())


def get_method(name: str, **options: Any) -> CompressionMethod:
    if name not in METHODS:
        raise DepthkitError(f"unknown method '{name}'; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


def method_for_plan(plan: CompressionPlan, name: str | None, options: dict[str, Any]) -> CompressionMethod:
    """The method that applies `plan`: the plan's (or `name`, if it shares the plan's search), with
    the plan's options updated by `options`.

    Any option that shaped the search given another value than the plan's is refused (compared as
    the method reads them, so a preset and the options it sets agree): the plan would not be what
    that option asks for. Options the method reads only in `apply` (`apply_options`) may differ.
    """
    cls = METHODS.get(name or plan.method)
    require(cls is not None, f"unknown method '{name or plan.method}'; choose from {', '.join(sorted(METHODS))}")
    require(cls.planned_as() == plan.method,
            f"the plan was searched by {plan.method}, not {name}: give no method (the plan names it), or search again "
            "without the plan")
    theirs = asdict(cls.options_class.from_dict(plan.options, cls.name))
    runner = cls(**{**plan.options, **options})
    ours = asdict(runner.settings)
    conflicts = sorted(key for key in ours if key not in cls.apply_options and ours[key] != theirs[key])
    require(not conflicts, f"option(s) {', '.join(f'{key}={ours[key]!r}' for key in conflicts)} differ from the plan's "
                           f"({', '.join(f'{key}={theirs[key]!r}' for key in conflicts)}), which its search depended "
                           "on: drop them, or search again without the plan")
    return runner


def blocks_to_remove(num_layers: int, ratio: float | None = None, target_layers: int | None = None) -> int:
    """How many blocks to remove for a depth ratio (fraction removed) or a target depth.

    Exactly one of `ratio` and `target_layers` must be given; at least one block must remain and
    at least one must go.
    """
    require((ratio is None) != (target_layers is None), "give exactly one of `ratio` and `target_layers`")
    if ratio is not None:
        require(0 < ratio < 1, f"ratio must be in (0, 1), got {ratio}")
        num_remove = round(num_layers * ratio)
        require(num_remove >= 1, f"ratio {ratio} of {num_layers} blocks removes no block")
    else:
        require(
            1 <= target_layers < num_layers,
            f"`target_layers` must be in 1..{num_layers - 1} for a {num_layers}-block model, got {target_layers}",
        )
        num_remove = num_layers - target_layers
    require(num_remove < num_layers, f"removing {num_remove} of {num_layers} blocks would leave none")
    return num_remove
