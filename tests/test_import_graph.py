"""The import graph of python/llmprune, read from the source with `ast`: every `import` and
`from ... import`, at module level or inside a function (a lazy import is still a dependency), and
under `if TYPE_CHECKING:`. The package must have no import cycle, and the layers below the command
line (calibration, model, data, evaluation, finetune) must not import it.

`python tests/test_import_graph.py` prints the listing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "llmprune"
COMPILED = "llmprune._core"  # the Rust extension: it imports nothing of the package


def module_name(path: Path) -> str:
    parts = ["llmprune", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an imported name that is a submodule counts as
    that submodule; the compiled `_core` is left out: it imports nothing of ours)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names if f"{src}.{a.name}" != COMPILED]
            else:
                continue
            edges.update(t for t in targets if t in files and t != mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def listing(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}" for m in sorted(graph))


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"llmprune.cli", "llmprune.cli.apply", "llmprune.calibration.activations", "llmprune.model.stream", "llmprune.data.windows"} <= set(graph)
    # a known edge, so the reader cannot silently return nothing
    assert "llmprune.model.stream" in graph["llmprune.calibration.activations"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_command_line_imports_it():
    below = ("llmprune.calibration", "llmprune.model", "llmprune.data", "llmprune.evaluation", "llmprune.finetune", "llmprune.methods")
    bad = sorted(
        f"{m} -> {n}" for m, edges in import_graph().items() if m.startswith(below) for n in edges if n == "llmprune.cli" or n.startswith("llmprune.cli.")
    )
    assert not bad, "modules below the command line import it:\n" + "\n".join(bad)


if __name__ == "__main__":
    print(listing(import_graph()))
