"""The package arrows point one way: ``worker -> app -> d4c_core`` (../shared/ARCHITECTURE.md).

``d4c_core`` is the engine and imports neither service package; ``app`` (the service core and
the HTTP layer) never imports ``worker``; only ``worker`` composes the two (``d4c serve``'s
in-process worker, ``worker/serve.py``). Checked on the source, every import statement
anywhere in a module (inside functions too, where a lazy import would hide from a glance at
the header), so a shortcut upward fails here rather than in a deployment that ships the API
without the worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the top-level packages it must not import
FORBIDDEN = {
    "app": {"worker", "tests", "bench"},
    "d4c_core": {"app", "worker", "tests", "bench"},
    "worker": {"tests", "bench"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    banned = FORBIDDEN[package]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, top in imported_packages(path)
        if top in banned
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_only(package: str) -> None:
    assert violations(package) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """An import inside a function body counts, both spellings."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import worker.tasks\n    from worker import queue\n")
    assert imported_packages(module) == [(2, "worker"), (3, "worker")]
