"""What a recursive model is: which layers loop, how a step's output feeds the next step, and
which adapters relax the shared weights.

The whole description is one JSON-serialisable dataclass so a checkpoint folder (base model +
`recursive_config.json` + adapter safetensors) rebuilds exactly the same modules before loading
their weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from depthkit.errors import DepthkitError, require

FEEDBACKS = ("connector", "vanilla")
ORDERS = ("cycle", "sequence")
PROJECTIONS = ("linear", "mlp")
FUSIONS = ("sum", "weighted")
RESIDUALS = ("embeddings", "previous", "output")
CONNECTOR_NORMS = ("embeddings", "residual")
CONFIG_FILE = "recursive_config.json"


# What a field meant before the defaults became the measured recipe (depthkit <= 0.3): a saved
# config without the field was trained with this value.
LEGACY_DEFAULTS = {"num_loops": 2, "residual": "embeddings", "scale_init": 0.0, "connector_norm": "embeddings"}


def default_of(name: str):
    """The default of a `RecursiveConfig` field: what the CLI and benchmarks offer as theirs."""
    return RecursiveConfig.__dataclass_fields__[name].default


@dataclass
class RecursiveConfig:
    """A loop plan over the base model's (unique) layers plus the feedback and adapter options.

    One forward pass at R loops runs `prelude` once, then R steps of `block` (CYCLE order: the
    whole block per step; SEQUENCE order: each block layer repeated R times in place, one step
    in all), each step followed by `coda` when its output is decoded. Indices are positions in
    the base model's layer list. The defaults (empty prelude/coda, block = every layer) loop the
    whole decoder, RecursiveVLM style.
    """

    block: list[int]
    prelude: list[int] = field(default_factory=list)
    coda: list[int] = field(default_factory=list)
    order: str = "cycle"
    # The defaults are the recipe benchmarks/recursion.py measures best on text (the README's table);
    # configs saved before a field existed load with what it meant then (`LEGACY_DEFAULTS`).
    num_loops: int = 3
    feedback: str = "connector"
    # Recursive Connector (feedback == "connector")
    connector_layers: list[int] | None = None
    connector_k: int = 4
    projection: str = "linear"
    fuse: str = "sum"
    residual: str = "previous"
    scale_init: float = 0.1
    # What sizes the connector's update (see connector.py): token by token, the RMS of the residual it
    # is added onto, or the input embeddings' RMS (a fixed size).
    connector_norm: str = "residual"
    # Initial RMSNorm gain of every tap; None = 1 / number of taps, times the embeddings' RMS unless the
    # update is sized by the residual.
    connector_gain: float | None = None
    num_modalities: int = 1
    # Relaxation: a LoRA per (shared layer, loop) on the native loops; rank 0 = strict sharing.
    loop_lora_rank: int | str = 0
    relaxed_loops: int = 0
    # Fine-tuning LoRA shared by every loop (0 = none).
    lora_rank: int = 0
    lora_alpha: float | None = None
    # Where the model came from (architecture check on reload, conversion record).
    model_type: str = ""
    hidden_size: int = 0
    num_base_layers: int = 0
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(len(self.block) > 0, "the recursive block needs at least one layer")
        require(self.order in ORDERS, f"unknown loop order '{self.order}'; choose from {', '.join(ORDERS)}")
        require(self.feedback in FEEDBACKS, f"unknown feedback '{self.feedback}'; choose from {', '.join(FEEDBACKS)}")
        require(self.projection in PROJECTIONS, f"unknown projection '{self.projection}'; choose from linear, mlp")
        require(self.fuse in FUSIONS, f"unknown fusion '{self.fuse}'; choose from sum, weighted")
        require(self.residual in RESIDUALS, f"unknown residual '{self.residual}'; choose from {', '.join(RESIDUALS)}")
        require(self.connector_norm in CONNECTOR_NORMS, f"unknown connector_norm '{self.connector_norm}'; "
                                                        f"choose from {', '.join(CONNECTOR_NORMS)}")
        require(self.connector_gain is None or self.connector_gain > 0,
                f"connector_gain must be positive, got {self.connector_gain}")
        require(self.num_modalities >= 1, f"num_modalities must be >= 1, got {self.num_modalities}")
        check_loops(self.num_loops)
        require(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        require(self.loop_lora_rank == "full" or (isinstance(self.loop_lora_rank, int) and self.loop_lora_rank >= 0),
                f"loop LoRA rank must be a non-negative integer or 'full', got {self.loop_lora_rank!r}")
        if self.loop_lora_rank not in (0, "0"):
            require(self.relaxed_loops >= 1, "per-loop LoRA needs the native loop count (relaxed_loops >= 1); "
                                             "build it with depthkit.recursive.relaxed.relax")
        if self.order == "sequence":
            require(self.feedback == "vanilla", "SEQUENCE sharing has no step boundary to put a connector on; "
                                                "use feedback 'vanilla'")
        if self.feedback == "connector":
            self.connector_positions()  # validates the sampled layers

    # -- derived -------------------------------------------------------------------------------
    def connector_positions(self) -> list[int]:
        """Block positions (0-based) whose outputs the connector reads: k uniformly sampled layers
        (k = 4: L/4, 2L/4, 3L/4, L, 1-based, rounded up) unless given explicitly."""
        size = len(self.block)
        if self.connector_layers is not None:
            positions = list(self.connector_layers)
            require(len(positions) > 0, "connector_layers must name at least one layer")
            bad = [p for p in positions if not 0 <= p < size]
            require(not bad, f"connector layer index {bad[0]} out of range: the recursive block has {size} layers "
                             f"(valid 0..{size - 1})")
            return positions
        require(1 <= self.connector_k <= size,
                f"connector_k must be in 1..{size} (the block's depth), got {self.connector_k}")
        return [math.ceil(i * size / self.connector_k) - 1 for i in range(1, self.connector_k + 1)]

    def num_steps(self, loops: int) -> int:
        """Decodable steps of a pass at `loops` loops (SEQUENCE order has one, at the end)."""
        return loops if self.order == "cycle" else 1

    def step_applications(self, step: int, loops: int) -> list[tuple[int, int]]:
        """(layer, loop) pairs applied in `step` of a pass at `loops` loops."""
        if self.order == "cycle":
            return [(layer, step) for layer in self.block]
        return [(layer, loop) for layer in self.block for loop in range(loops)]

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RecursiveConfig:
        """A saved config; keys it lacks take the value they had when it was saved (`LEGACY_DEFAULTS`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        require(not unknown, f"unknown recursive config keys: {', '.join(unknown)}")
        return cls(**(LEGACY_DEFAULTS | data))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> RecursiveConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.exists():
            raise DepthkitError(f"{folder} is not a recursive model folder (no {CONFIG_FILE})")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise DepthkitError(f"{path} is not a valid recursive config: {err}") from err


# Deeper than any recursion measured here (16) by far; beyond it a mistyped R (100000) would only fill
# memory with cache slots (23.7 GB on 16 tokens before the kernel killed it).
MAX_LOOPS = 256


def check_loops(loops: int) -> int:
    """Loops must be a positive integer (R = 0 would skip the decoder entirely), at most `MAX_LOOPS`."""
    require(isinstance(loops, int) and not isinstance(loops, bool) and 1 <= loops <= MAX_LOOPS,
            f"number of loops must be an integer in 1..{MAX_LOOPS}, got {loops!r}")
    return loops
