"""The layer contract of the package, stated once for every module (static imports, read with ast).

    data -> models -> methods -> train -> studies -> viz -> notebooks

A module may import its own layer and the layers before it. ``probes`` and ``eval`` (pure maths)
and the infrastructure modules ``utils`` and ``registry`` sit under every layer: anyone may import
them, and they import nothing else of the workbench. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "workbench"
LAYERS = ("data", "models", "methods", "train", "studies", "viz")
BOTTOM = ("probes", "eval", "utils", "registry")
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _unit(module: str) -> str | None:
    """``workbench.models.capture`` -> ``models``; ``workbench`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def _imports(path: Path, module: str, is_package: bool):
    """The absolute workbench modules ``path`` imports, with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == PACKAGE:  # "from . import x" / "from workbench import x"
                for alias in node.names:
                    yield f"{target}.{alias.name}", node.lineno
            else:
                yield target, node.lineno


def allowed(importer: str, imported: str) -> bool:
    """Whether a module of unit ``importer`` may import unit ``imported`` (units: data, models, ...)."""
    if importer == imported:
        return True
    if importer in BOTTOM:
        return False  # pure maths and infrastructure import nothing else of the workbench
    if imported in BOTTOM:
        return True
    return LAYERS.index(imported) <= LAYERS.index(importer)


def layer_violations(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Every import in ``root`` that breaks the contract, as ``file:line: a imports b`` lines."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        unit = _unit(module)
        if unit is None:
            continue  # the top-level __init__ only holds the version
        if unit not in LAYERS + BOTTOM:
            problems.append(f"{path}: module {module} is in no layer; add '{unit}' to the contract")
            continue
        for target, line in _imports(path, module, is_package):
            other = _unit(target)
            if other is not None and not allowed(unit, other):
                problems.append(f"{path.relative_to(root.parent)}:{line}: {module} ({unit}) imports {target} ({other})")
    return problems


def test_every_module_follows_the_layer_contract():
    assert layer_violations() == []


def test_every_unit_of_the_package_is_in_a_layer():
    units = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    units |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert units == set(LAYERS) | set(BOTTOM)


def test_the_contract_catches_a_backwards_import(tmp_path):
    """The check is not vacuous: a synthetic package with backwards imports is caught, line by line."""
    pkg = tmp_path / PACKAGE
    for unit in ("data", "models", "train", "probes"):
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "ok.py").write_text("import numpy\nfrom ..probes import x\n")
    (pkg / "models" / "fine.py").write_text("from ..data import ok\nfrom workbench.data.ok import y\n")
    (pkg / "data" / "bad.py").write_text("import os\n\ndef f():\n    from ..train import run\n")
    (pkg / "probes" / "impure.py").write_text("from workbench.models import fine\n")
    (pkg / "models" / "sneaky.py").write_text("from .. import train\n")
    found = layer_violations(pkg, PACKAGE)
    assert len(found) == 3, found
    assert any("bad.py:4" in p and "imports workbench.train" in p for p in found)
    assert any("impure.py:1" in p and "(probes) imports workbench.models" in p for p in found)
    assert any("sneaky.py:1" in p and "imports workbench.train" in p for p in found)
