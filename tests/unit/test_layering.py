"""The import rules of DESIGN.md: ctypes only in lazarus/kernel, images free of the kernel layer at import
time, lazy never importing restore (it is handed uffds), and nothing below the CLI reading options."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lazarus"


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_ctypes_only_in_kernel_layer() -> None:
    offenders = [p.relative_to(PKG) for p in modules() if "ctypes" in imports(p) and p.parent.name != "kernel"]
    assert not offenders, f"ctypes imported outside lazarus/kernel: {offenders}"


def test_images_import_nothing_but_errors_at_load() -> None:
    for p in modules("images"):
        bad = {m for m in imports(p, top_level_only=True) if m.startswith("lazarus") and
               not m.startswith(("lazarus.errors", "lazarus.images", "lazarus.records"))}
        assert not bad, f"{p.name} imports {bad} at load time"


def test_lazy_never_imports_restore() -> None:
    for p in modules("lazy"):
        bad = {m for m in imports(p) if m.startswith(("lazarus.restore", "lazarus.dump", "lazarus.cli"))}
        assert not bad, f"{p.name} imports {bad}"


def test_only_cli_reads_options() -> None:
    for p in modules():
        if p.name in ("cli.py", "__main__.py") or (p.parent.name == "lazy" and p.name == "guard.py"):
            continue  # the guard is also a tiny program of its own (python -m lazarus.lazy.guard)
        assert "argparse" not in imports(p), f"{p.relative_to(PKG)} reads options"
