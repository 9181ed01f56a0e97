"""A compression plan: what a method's search chose, kept apart from the surgery that applies it.

Every method is a search and an apply (`CompressionMethod.search` returns a `CompressionPlan`,
`CompressionMethod.apply` performs it), as NVIDIA ModelOpt separates the search of a pruning
configuration from the pruning itself. The plan holds which blocks go, which groups are merged or
flattened, which attention sublayers are dropped or which widths every block keeps, in the order
the search chose them and with the score of each choice; it is saved as JSON. Applying a plan never
searches again, so one search serves other ratios (below), other fitting options (FlattenGPT's and
width pruning's least squares run in apply), and the command line (`depthkit compress --save-plan
FILE`, later `--plan FILE`).

Which block counts a plan serves EXACTLY, i.e. with the model a fresh search for that count would
give (`reuse`; each method's docstring says why its search is what it is):

- `ranking`: scores measured once on the original model and ranked (ShortGPT, attention drop):
  the plan ranks every item, and any count takes the first ones of the ranking.
- `prefix`: a greedy or sequential search (SLEB, FlattenGPT, LaCo): a search for fewer blocks
  makes the same first steps and stops earlier, so a count that the first steps reach exactly is
  served by them (`removes` says how many blocks each step removes). A count the plan was not
  searched that far for, or one that falls inside a step, is refused: a fresh search is needed.
- `exact`: only the count it was searched for (`reuse_reason` says why).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from itertools import accumulate
from pathlib import Path
from typing import Any

from depthkit.errors import DepthkitError, require
from depthkit.utils.io import atomic_write_text, json_text

PLAN_FORMAT = 1
REUSES = ("ranking", "prefix", "exact")


@dataclass
class CompressionPlan:
    """What a method's search chose, in order, and what it was searched for.

    `steps` is the ordered selection, one dict per step in the method's own terms (a block, a group
    of blocks, a merge at a position; `score`: what the search measured for it); `prefix` plans
    give every step `removes`, the blocks it removes. `details` holds what else the search found
    that the compression card reports (calibration shape, thresholds tried, budget figures).
    """

    method: str
    options: dict[str, Any]  # the method's options as given to the search
    model: str  # the source model's name or folder ("" for a model in memory without one)
    num_layers: int  # the source model's depth
    num_remove: int  # blocks the search was run for
    reuse: str  # ranking | prefix | exact (module docstring)
    steps: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    reuse_reason: str = ""  # why an `exact` plan serves only its own count
    format: int = PLAN_FORMAT

    # -- which counts it serves ------------------------------------------------------------------
    def counts(self) -> list[int]:
        """Blocks removed after each step of a `prefix` plan (the counts its prefixes serve)."""
        return list(accumulate(step["removes"] for step in self.steps))

    def steps_for(self, num_remove: int) -> int:
        """How many of the steps of a `prefix` or `exact` plan give `num_remove` blocks (all of them
        for the count it was searched for)."""
        self.check_count(num_remove)
        if num_remove == self.num_remove or self.reuse != "prefix":
            return len(self.steps)
        return self.counts().index(num_remove) + 1

    def check_count(self, num_remove: int) -> None:
        """Refuse a count the plan cannot serve exactly (a fresh search is needed for it)."""
        if num_remove == self.num_remove or self.reuse == "ranking":
            return
        again = "run without the plan to search again"
        require(self.reuse == "prefix",
                f"this {self.method} plan serves only the {self.num_remove} blocks it was searched for "
                f"({self.reuse_reason}), not {num_remove}: {again}")
        require(num_remove < self.num_remove,
                f"this {self.method} plan was searched for {_blocks(self.num_remove)}; removing {num_remove} needs a "
                f"longer search: {again} (or search for at least {num_remove})")
        reached = self.counts()[-1] if self.steps else 0
        require(num_remove <= reached, f"this {self.method} plan's search removed only {_blocks(reached)} of the "
                                       f"{self.num_remove} it was searched for: {again}")
        require(num_remove in self.counts(),
                f"this {self.method} plan's steps remove {', '.join(map(str, self.counts()))} blocks in turn; "
                f"{num_remove} falls inside a step, which a fresh search would make smaller: {again}")

    def check_model(self, num_layers: int) -> None:
        require(num_layers == self.num_layers,
                f"this {self.method} plan was searched on a {self.num_layers}-block model"
                + (f" ({self.model})" if self.model else "") + f", not this {num_layers}-block one")

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the plan as strict JSON through a temporary file (a kill never leaves half a plan)."""
        return atomic_write_text(path, self.to_json())

    def to_json(self) -> str:
        return json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str, where: str = "the plan") -> CompressionPlan:
        def not_a_number(name: str) -> None:
            raise DepthkitError(f"{where} is not strict JSON ({name} is no JSON number)")

        try:
            data = json.loads(text, parse_constant=not_a_number)
        except json.JSONDecodeError as err:
            raise DepthkitError(f"{where} is not JSON ({err.msg} at line {err.lineno}); give a plan written by "
                                "`save_plan` or a compression card") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        """A plan file (`--save-plan`), or a compression card, whose `plan` it takes."""
        path = Path(path)
        require(path.exists(), f"plan file {path} does not exist")
        require(path.is_file(), f"plan file {path} is a folder; give the JSON file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise DepthkitError(f"cannot read plan file {path}: {err}") from None
        return cls.from_json(text, f"plan file {path}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "the plan") -> CompressionPlan:
        """A plan from its JSON form, every field checked: a hand-edited or truncated plan is one clear
        error here, not a wrong model later. A compression card is read as the plan it records."""
        require(isinstance(data, dict), f"{where} is not a compression plan (a JSON object with a method and steps)")
        if "plan" in data and "details" in data:  # a compression card
            require(isinstance(data["plan"], dict), f"{where} is a compression card without a plan")
            data = data["plan"]
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - {"details", "reuse_reason"})
        require(not missing, f"{where} is not a compression plan: no {', '.join(missing)}")
        require(not unknown, f"{where} has unknown field(s) {', '.join(unknown)}")
        require(data["format"] == PLAN_FORMAT, f"{where} has plan format {data['format']!r}; this depthkit reads "
                                               f"format {PLAN_FORMAT}")
        plan = cls(**data)
        plan._validate(where)
        return plan

    def _validate(self, where: str) -> None:
        require(isinstance(self.method, str) and isinstance(self.model, str), f"{where}: method and model are text")
        require(isinstance(self.options, dict) and isinstance(self.details, dict),
                f"{where}: options and details are JSON objects")
        require(_whole(self.num_layers) and _whole(self.num_remove) and 1 <= self.num_remove < self.num_layers,
                f"{where}: num_layers and num_remove must be whole numbers with 1 <= num_remove < num_layers")
        require(self.reuse in REUSES, f"{where}: reuse must be one of {', '.join(REUSES)}, got {self.reuse!r}")
        require(isinstance(self.steps, list) and all(isinstance(step, dict) for step in self.steps),
                f"{where}: steps must be a list of JSON objects")
        for step in self.steps:
            self._check_step(step, where)
        if self.reuse == "ranking":
            require(sorted(step.get("block", -1) for step in self.steps) == list(range(self.num_layers)),
                    f"{where}: a ranking plan ranks every block 0..{self.num_layers - 1} once (`block` of each step)")
        if self.reuse == "prefix":
            require(all(_whole(step.get("removes")) and step["removes"] >= 1 for step in self.steps),
                    f"{where}: every step of a prefix plan says how many blocks it removes (`removes` >= 1)")
            require(not self.steps or self.counts()[-1] <= self.num_remove,
                    f"{where}: its steps remove more than the {self.num_remove} blocks it was searched for")

    def _check_step(self, step: dict[str, Any], where: str) -> None:
        """The keys the methods' steps share, typed (`block`, `blocks`: original block indices)."""
        last = self.num_layers - 1

        def index(value: Any) -> bool:
            return _whole(value) and 0 <= value <= last

        if "block" in step:
            require(index(step["block"]), f"{where}: `block` must be a block index 0..{last}, got {step['block']!r}")
        if "blocks" in step:
            require(isinstance(step["blocks"], list) and step["blocks"] and all(map(index, step["blocks"])),
                    f"{where}: `blocks` must be a list of block indices 0..{last}, got {step['blocks']!r}")
        if "position" in step:
            require(index(step["position"]), f"{where}: `position` must be 0..{last}, got {step['position']!r}")
        if "score" in step:
            require(step["score"] is None or (isinstance(step["score"], (int, float))
                                              and not isinstance(step["score"], bool)),
                    f"{where}: `score` must be a number, got {step['score']!r}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _blocks(count: int) -> str:
    return f"{count} block" + ("" if count == 1 else "s")
