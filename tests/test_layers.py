"""The layers are folders: the core (``tokattr/`` outside ``lightning/`` and ``cli/``) imports
neither Lightning nor W&B, anywhere in a module (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokattr"
OUTER = ("lightning", "pytorch_lightning", "lightning_fabric", "wandb", "wandb_workspaces")
LAYERS = ("lightning", "cli")  # the folders allowed to import them


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_core_module_imports_lightning_or_wandb():
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in LAYERS]
    assert len(core) > 20  # the scan sees the package
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(_imports(p) & set(OUTER))
        for p in core
        if _imports(p) & set(OUTER)
    }
    assert not offenders, offenders


def test_the_layers_do_import_them():
    """The scan can fail: the Lightning layer is where Lightning is imported."""
    assert "lightning" in _imports(PACKAGE / "lightning" / "runner.py")
    assert "lightning" in _imports(PACKAGE / "lightning" / "wandb_log.py")
    assert "lightning" in _imports(PACKAGE / "cli" / "bench.py")


def test_import_tokattr_loads_neither():
    code = (
        "import sys, tokattr, tokattr.cli, tokattr.report; "
        f"bad = [m for m in {OUTER!r} if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
