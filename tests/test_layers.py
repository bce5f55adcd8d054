"""The layout's layers, checked on the source: the core imports only torch, numpy, regex, the
standard library and the core below it; infra/ imports the core and itself, never an entry point;
the entry points (train.py, sample.py) compose both; no module imports itself back through others.

Every import counts, at any depth: inside functions and `if __name__ == "__main__":` blocks too.
The command lines that live in infra/ run as `python -m infra.MODULE`.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each core module and the core modules it may import.
CORE = {
    "tokenizer": set(),
    "model": set(),
    "config": {"model", "tokenizer"},
    "data": {"model", "tokenizer", "config"},
}
ENTRY_POINTS = {"train", "sample"}
THIRD_PARTY = {"torch", "numpy", "regex"}
# Lines a core file, and the core in all, may hold: each is read top to bottom in one sitting.
CORE_LIMIT, CORE_TOTAL_LIMIT = 400, 1800


def project_modules() -> dict[str, Path]:
    """{dotted name: path} of every module of the project (not tests, bench or config files)."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    modules["config"] = ROOT / "config" / "__init__.py"
    for path in (ROOT / "infra").glob("*.py"):
        modules["infra" if path.stem == "__init__" else f"infra.{path.stem}"] = path
    return modules


MAIN_TESTS = {"__name__ == '__main__'", "'__main__' == __name__"}


def main_block(tree: ast.Module) -> ast.If | None:
    """The module's `if __name__ == "__main__":` block, if it has one."""
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in MAIN_TESTS:
            return node
    return None


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The imports of a file, as project module names where they are the project's and top-level
    package names otherwise."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # the longest project module the name starts with, else its top-level package
            parts = name.split(".")
            module = next(
                (
                    ".".join(parts[:i])
                    for i in range(len(parts), 0, -1)
                    if ".".join(parts[:i]) in known
                ),
                parts[0],
            )
            found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: imports_of(path, set(modules)) & set(modules) - {name}
        for name, path in modules.items()
    }


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that points the wrong way."""
    found = []
    for module, targets in graph.items():
        for target in targets:
            if module in CORE and target not in CORE[module]:
                found.append(f"{module} -> {target}: the core imports only the core below it")
            if module.startswith("infra") and target in ENTRY_POINTS:
                found.append(f"{module} -> {target}: infra never imports an entry point")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of the graph (one path per circle found by depth-first search)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_layers_hold_and_there_is_no_import_circle():
    graph = import_graph()
    assert {"tokenizer", "model", "config", "data", "train", "sample"} <= set(graph)
    assert layer_violations(graph) == []
    assert cycles(graph) == []


def test_the_core_imports_no_other_package():
    modules = project_modules()
    allowed = THIRD_PARTY | set(sys.stdlib_module_names) | set(modules)
    for name in CORE:
        imported = imports_of(modules[name], set(modules))
        assert imported <= allowed, f"{name} imports {sorted(imported - allowed)}"


def test_a_planted_upward_import_or_circle_is_found(tmp_path):
    graph = import_graph()
    assert layer_violations({**graph, "model": graph["model"] | {"infra.checkpoint"}})
    assert layer_violations({**graph, "data": graph["data"] | {"train"}})
    assert layer_violations({**graph, "infra.run": graph["infra.run"] | {"sample"}})
    assert cycles({**graph, "model": graph["model"] | {"config"}})
    # a lazy import inside a function counts, and so does one in the `__main__` block
    planted = tmp_path / "core.py"
    planted.write_text(
        "def f():\n    import infra.prepare\n\n"
        "if __name__ == '__main__':\n    from infra.tokenizer_cli import main\n"
    )
    known = {"infra.prepare", "infra.tokenizer_cli"}
    assert imports_of(planted, known) == known


def test_imports_are_absolute_and_main_blocks_are_thin():
    """The graph reads absolute names: a relative import would escape it. A `__main__` block is an
    entry point's hand-over only while it is thin: an import and a call of main()."""
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert relative == [], f"{name}: a relative import at line(s) {relative}"
        block = main_block(tree)
        assert block is None or len(block.body) <= 2, f"{name}: its __main__ block is not thin"


@pytest.mark.parametrize("name", sorted(CORE) + sorted(ENTRY_POINTS))
def test_each_core_file_reads_in_one_sitting(name):
    lines = len(project_modules()[name].read_text().splitlines())
    assert lines <= CORE_LIMIT, f"{name}: {lines} lines"


def test_the_core_stays_within_its_line_budget():
    modules = project_modules()
    total = sum(len(modules[name].read_text().splitlines()) for name in [*CORE, *ENTRY_POINTS])
    assert total <= CORE_TOTAL_LIMIT, total
