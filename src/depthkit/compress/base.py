"""The compression-method registry and what every depth-compression method shares.

A method is one file in `depthkit/compress/methods/` that defines a subclass of
`CompressionMethod` decorated with `@register_method("name")` (a second method of the same name is
an error); `depthkit.compress` imports them all once this module is complete, so nothing here
imports the methods (no import circle). It reads the model through a block source (in memory or
streamed from disk, `depthkit.models.runner`) with calibration token blocks and how many blocks to
remove, writes the new blocks to a sink (the model in memory, or a new checkpoint), and returns
what it did (`CompressionOutcome`), which becomes the compression card.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

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
    """Base class: subclasses set `name`, `description`, `options_class` and implement `compress`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The publication the method follows ("" for depthkit's own); the card names it.
    paper: ClassVar[str] = ""
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    # False for methods whose result is never a standard checkpoint, so `--out` is refused up front.
    produces_checkpoint: ClassVar[bool] = True

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

    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        """Compress `model` in memory: the blocks the method writes become its blocks.

        Methods that need the whole model at once (and cannot stream) override this instead of
        `compress_blocks`.
        """
        with ModelSink(model) as sink:
            return self.compress_blocks(InMemoryModel(model), calib_ids, num_remove, sink)

    def compress_blocks(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:  # pragma: no cover - interface
        """The method, written once for both backends: read the model through `source` (in memory,
        or streamed from disk one block at a time) and write the new blocks to `sink` in order."""
        raise NotImplementedError

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
        return cls.produces_checkpoint and cls.compress_blocks is not CompressionMethod.compress_blocks


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
