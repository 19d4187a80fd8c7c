"""The ``kernels`` name hazard (see ENVIRONMENT.md, "Packaging").

transformers probes for a top-level ``kernels`` module (the Hugging Face kernels hub) when model
classes are imported. With the repo root on ``sys.path`` (``python -m pytest``, ``python -c``
from the root) it finds our ``kernels/`` folder and imports it a second time as ``kernels``;
a relative import or a ``__version__`` in it then breaks ``from transformers import ...``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted((REPO_ROOT / "kernels").glob("*.py"))


def _run_from_repo_root(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with cwd = repo root, so the root is ``sys.path[0]``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # importing (not launching) kernels needs no interpreter
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_transformers_and_kernels_import_from_repo_root() -> None:
    proc = _run_from_repo_root(
        "import pathlib, sys\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "from transformers import LlamaForCausalLM, OPTForCausalLM\n"
        "import quantkit.kernels.pack as m\n"
        "print(pathlib.Path(m.__file__).resolve())\n"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the installed quantkit.kernels is this repo's kernels/ folder (package-dir mapping)
    assert Path(proc.stdout.strip().splitlines()[-1]) == REPO_ROOT / "kernels" / "pack.py"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernel_modules_use_absolute_imports_and_no_version(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: relative import"
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            assert "__version__" not in names, f"{path.name}:{node.lineno}: defines __version__"
