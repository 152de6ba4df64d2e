"""The package's shape as a newcomer meets it: imports flow one way, with no circles.

The graph is built from the source with `ast` (every import, including the ones inside functions
and under TYPE_CHECKING: a lazy import is still a dependency), module by module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cifar_transfer

SRC = Path(cifar_transfer.__file__).parent
PACKAGE = "cifar_transfer"
# Lower layers never import higher ones. training and results share a layer and never import
# each other: results (the tools for finished runs) must work without the training code.
LAYERS = [
    {"system"},
    {"config"},
    {"recipes"},
    {"data"},
    {"models"},
    {"artifacts"},
    {"training", "results"},
    {"serving"},
    {"cli", "__main__", "__init__"},
]
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_the_import_graph_has_no_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]


def test_imports_flow_one_way_down_the_data_flow():
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            same_top = mod.split(".")[:2] == dep.split(".")[:2]
            if dep == PACKAGE and mod != PACKAGE:
                wrong.append(f"{mod} imports the package root (import the module itself)")
            elif not same_top and layer_of(dep) >= layer_of(mod) and layer_of(mod) < len(LAYERS) - 1:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_sits_in_a_layer():
    for mod in modules():
        layer_of(mod)


def test_no_module_or_class_is_too_big_to_read():
    too_big = []
    for name, path in modules().items():
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            too_big.append(f"{name}: {n} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{name}.{node.name}: {size} lines (> {MAX_CLASS_LINES})")
    assert not too_big, "split these:\n" + "\n".join(too_big)


def test_the_public_api_imports_from_the_package_root_without_loading_torch():
    import subprocess
    import sys

    code = (
        "import sys, cifar_transfer\n"
        "assert 'torch' not in sys.modules\n"
        "from cifar_transfer import (BackboneFamily, BackboneSpec, keep_freed_memory, load_model,\n"
        "    predict_logits, register_backbone)\n"
        "print(load_model.__module__, predict_logits.__module__, register_backbone.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "cifar_transfer.artifacts.bundle", "cifar_transfer.models.inference",
        "cifar_transfer.models.backbones",
    ]


def test_every_module_is_in_the_layout_page():
    """docs/reference/layout.md's table names every module, so a newcomer's map never goes stale."""
    page = SRC.parent.parent / "docs" / "reference" / "layout.md"
    if not page.is_file():
        import pytest

        pytest.skip("no docs/ beside src/ (an installed package)")
    text = page.read_text()
    missing = []
    for name, path in modules().items():
        package_init = path.name == "__init__.py" and (
            path.parent == SRC or len(list(path.parent.glob("*.py"))) > 1
        )
        if path.name == "__main__.py" or package_init:
            continue  # the package root, or a package of modules: its modules are listed
        row = name.removeprefix(f"{PACKAGE}.").replace(".", "/")
        if f"| `{row}` |" not in text:
            missing.append(row)
    assert not missing, f"add these to {page.name}'s table: {missing}"


def test_every_module_imports_and_every_imported_name_exists():
    """A moved name leaves no `from x import name` behind that only fails when that path runs."""
    import importlib

    for name in sorted(modules()):
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                target = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(target, alias.name) or f"{node.module}.{alias.name}" in modules(), (
                        f"{name} imports {alias.name} from {node.module}, which has no such name"
                    )
