"""The package's structure: no import circles, no LLaMA module names outside `depthkit.models`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import depthkit

SOURCE = Path(depthkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """depthkit modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_depthkit():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


# Sub-module names of LLaMA-family decoder layers: only adapters (depthkit.models) may name them.
LLAMA_NAMES = re.compile(r"\b(self_attn|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|input_layernorm|"
                         r"post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\b")


def test_no_llama_module_names_outside_models():
    offenders = [f"{path.relative_to(SOURCE)}:{number}"
                 for path in SOURCE.rglob("*.py") if "models" not in path.relative_to(SOURCE).parts[:1]
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if LLAMA_NAMES.search(line)]
    assert not offenders, offenders
