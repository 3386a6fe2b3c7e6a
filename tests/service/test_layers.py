"""The layer rule of ``docs/ARCHITECTURE.md``, checked against every import in ``service/``.

The layers are read from the document itself (its ``layers`` block), so the map and the code
cannot drift apart: a package may import its own modules and packages on lower layers, never a
package on its own layer or above; no import cycle between modules; ``service/`` never imports
``training/``; inside ``service/api/`` only the wiring knows concrete runtime classes.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# What service/api may use of the runtime outside the wiring: the contracts, the registry's
# refusals and store (the admin API maps them), and types only for annotations.
API_MAY_IMPORT = ("service.scoring.contracts", "service.registry.errors", "service.registry.archive",
                  "service.registry.store")
RUNTIME_PACKAGES = ("service.scoring", "service.registry", "service.engine", "service.model",
                    "service.personalization", "service.crm", "service.llm", "service.retrieval")


def documented_layers() -> dict[str, int]:
    """``{package: layer}`` from the ```layers block of ARCHITECTURE.md (``N  a, b`` per line)."""
    block = re.search(r"```layers\n(.*?)```", ARCHITECTURE.read_text(), re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    layers = {}
    for line in block.group(1).strip().splitlines():
        number, names = line.split(maxsplit=1)
        for name in names.split("#")[0].split(","):
            layers[name.strip()] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """Every absolute import in the file (module level or not), with whether it sits under
    ``if TYPE_CHECKING:`` (an annotation-only dependency)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            typing_only |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in typing_only))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1].removesuffix(".py") if len(parts) > 1 else ""


MODULES = {module_name(p): p for p in sorted(SERVICE.rglob("*.py"))}
# Parsed once, at collection: before any test runs, so no earlier test's deep recursion (the
# nesting limits of request bodies) can disturb the parser's own recursion accounting.
IMPORTS = {module: imports(path) for module, path in MODULES.items()}


def test_every_package_has_a_layer():
    layers = documented_layers()
    packages = {package_of(m) for m in MODULES} - {""}
    assert packages <= set(layers), f"not in the layers of ARCHITECTURE.md: {sorted(packages - set(layers))}"
    assert set(layers) <= packages, f"layers name packages that do not exist: {sorted(set(layers) - packages)}"


def test_no_import_runs_up_or_across_the_layers():
    layers = documented_layers()
    wrong = []
    for module in MODULES:
        source = package_of(module)
        for target, _ in IMPORTS[module]:
            if target.startswith("training"):
                wrong.append(f"{module} imports {target}: service never imports training")
            if not target.startswith("service.") or package_of(target) == source or not source:
                continue
            if layers[package_of(target)] >= layers[source]:
                wrong.append(f"{module} (layer {layers[source]}) imports {target} "
                             f"(layer {layers[package_of(target)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, typing_only in IMPORTS[module]:
            if target in MODULES and target != module and not typing_only:
                graph[module].add(target)
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("service.api") and m != "service.api.wiring"
                                    and m != "service.api"])
def test_only_the_wiring_knows_concrete_runtime_classes(module):
    for target, typing_only in IMPORTS[module]:
        if typing_only or not target.startswith(RUNTIME_PACKAGES):
            continue
        assert target in API_MAY_IMPORT, f"{module} imports {target}: only service.api.wiring builds the runtime"


def test_the_api_never_probes_its_parts():
    for path in (SERVICE / "api").rglob("*.py"):
        text = path.read_text()
        assert "importlib" not in text and "hasattr(" not in text, f"{path.relative_to(ROOT)} probes for its parts"


def test_fusion_is_defined_once():
    trees = ("service", "training", "tests", "benchmarks", "scripts")
    defined = [p for top in trees for p in (ROOT / top).rglob("*.py")
               if re.search(r"^class Fusion\b", p.read_text(errors="ignore"), re.M)]
    assert [p.relative_to(ROOT).as_posix() for p in defined] == ["service/model/fusion.py"]
