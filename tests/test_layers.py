"""Imports run one way: ``core`` at the bottom, ``ingest`` and ``scaler`` side by
side on it, the command line and its tools (``tickscale``) on top.

Every import counts, a function's deferred ones too: a deferred upward import
is still an upward arrow, only a later one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each layer may import, of this project's packages.
ALLOWED = {
    "core": {"core"},
    "ingest": {"core", "ingest"},
    "scaler": {"core", "scaler"},
    "tickscale": {"core", "ingest", "scaler", "tickscale"},
}


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            prefix = base if node.level else []
            if node.module:
                yield node.lineno, ".".join([*prefix, node.module])
            else:  # ``from .. import x``: each name may be a module
                for alias in node.names:
                    yield node.lineno, ".".join([*prefix, alias.name])


def upward_imports(root: Path) -> list[str]:
    """``file:line: a -> b`` for every import of a layer ``a`` may not import."""
    found = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts)
            for line, name in _imports(path, module):
                top = name.split(".")[0]
                if top in ALLOWED and top not in allowed:
                    found.append(f"{rel}:{line}: {layer} -> {name}")
    return found


def test_no_upward_import() -> None:
    assert upward_imports(ROOT) == []


def test_the_check_sees_an_upward_import_however_written(tmp_path: Path) -> None:
    for layer in ALLOWED:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from ingest import x\n")
    (tmp_path / "ingest" / "b.py").write_text("def f():\n    import scaler.policy\n")
    (tmp_path / "scaler" / "c.py").write_text("from tickscale.localstack import y\n")
    (tmp_path / "scaler" / "d.py").write_text("from .. import ingest\n")
    (tmp_path / "tickscale" / "e.py").write_text("import core, ingest, scaler\n")
    assert upward_imports(tmp_path) == [
        "core/a.py:1: core -> ingest",
        "ingest/b.py:2: ingest -> scaler.policy",
        "scaler/c.py:1: scaler -> tickscale.localstack",
        "scaler/d.py:1: scaler -> ingest",
    ]


# What the handler and scaler images run: the command line and every module its
# handler, scaler, replay, verify and topics commands load.
IMAGE_MODULES = [
    "tickscale.cli",
    "ingest.handler.service",
    "ingest.replay.run",
    "ingest.verify",
    "core.topology",
    "scaler.app",
    "scaler.cli",
    "scaler.service",
    "scaler.backends.docker",
    "scaler.backends.swarm",
    "scaler.backends.process",
    "scaler.keda.app",
]


def test_the_images_never_load_the_local_stack() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {IMAGE_MODULES!r}: importlib.import_module(m)\n"
        "stack = ('tickscale.localstack', 'tickscale.up', 'tickscale.keeper')\n"
        "print(sorted(m for m in sys.modules if m in stack or m.startswith("
        "tuple(s + '.' for s in stack))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
