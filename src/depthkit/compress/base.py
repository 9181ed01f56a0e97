"""The compression-method registry and what every depth-compression method shares.

A method is one file in `depthkit/compress/methods/` that defines a subclass of
`CompressionMethod` decorated with `@register_method("name")`. It receives the model, calibration
token blocks and how many blocks to remove, edits the model in place, and returns what it did
(`CompressionOutcome`), which becomes the compression card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedModel

from depthkit.errors import DepthkitError, require

if TYPE_CHECKING:
    from depthkit.models.streaming import StreamingModel, StreamingWriter

METHODS: dict[str, type[CompressionMethod]] = {}


@dataclass
class CompressionOutcome:
    """What a method did: removed/merged blocks and method-specific details for the card."""

    details: dict[str, Any] = field(default_factory=dict)
    # False for results that are not plain standard checkpoints (e.g. unpruned double-width blocks).
    saveable: bool = True


class CompressionMethod:
    """Base class: subclasses set `name`, `description` and implement `compress`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Option name -> one-line help. When a method declares its options, unknown ones (typos in
    # `--option key=value`) are refused instead of silently ignored.
    option_help: ClassVar[dict[str, str]] = {}
    # False for methods whose result is never a standard checkpoint, so `--out` is refused up front.
    produces_checkpoint: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_help)) if self.option_help else []
        require(not unknown, f"method '{self.name}' has no option {', '.join(unknown)}; "
                             f"its options: {', '.join(sorted(self.option_help))}")
        self.options = options

    def compress(
        self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int
    ) -> CompressionOutcome:  # pragma: no cover - interface
        raise NotImplementedError

    def compress_streaming(
        self, source: StreamingModel, calib_ids: torch.Tensor, num_remove: int, writer: StreamingWriter
    ) -> CompressionOutcome:
        """Compress a checkpoint read block by block from disk, writing the new blocks in order.

        Only methods that need no more than a block or two at a time implement this
        (`--offload disk`); the others keep the whole model in memory.
        """
        raise DepthkitError(
            f"method '{self.name}' needs the whole model in memory; --offload disk works with: "
            + ", ".join(streaming_methods())
        )

    @classmethod
    def streams(cls) -> bool:
        return cls.compress_streaming is not CompressionMethod.compress_streaming


def register_method(name: str):
    """Class decorator: make a `CompressionMethod` available by `name`."""

    def decorator(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def streaming_methods() -> list[str]:
    """Registered methods that can compress a checkpoint streamed from disk."""
    import depthkit.compress.methods  # noqa: F401 - registers the built-in methods

    return sorted(name for name, cls in METHODS.items() if cls.streams())


def get_method(name: str, **options: Any) -> CompressionMethod:
    import depthkit.compress.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        raise DepthkitError(f"unknown method '{name}'; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


def blocks_to_remove(num_layers: int, ratio: float | None = None, target_layers: int | None = None) -> int:
    """How many blocks to remove for a depth ratio (fraction removed) or a target depth.

    Exactly one of `ratio` and `target_layers` must be given; at least one block must remain and
    at least one must go.
    """
    require((ratio is None) != (target_layers is None), "give exactly one of --ratio and --target-layers")
    if ratio is not None:
        require(0 < ratio < 1, f"ratio must be in (0, 1), got {ratio}")
        num_remove = round(num_layers * ratio)
        require(num_remove >= 1, f"ratio {ratio} of {num_layers} blocks removes no block")
    else:
        require(
            1 <= target_layers < num_layers,
            f"--target-layers must be in 1..{num_layers - 1} for a {num_layers}-block model, got {target_layers}",
        )
        num_remove = num_layers - target_layers
    require(num_remove < num_layers, f"removing {num_remove} of {num_layers} blocks would leave none")
    return num_remove
