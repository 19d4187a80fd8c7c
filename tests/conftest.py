"""Test-wide setup: Triton kernels run in the interpreter, the hub is never contacted.

TRITON_INTERPRET must be set before any module that defines a ``@triton.jit`` kernel is
imported, so it is set here at import time of the test session (pytest imports conftest
first). The Makefile and .ci/run set the same variables.

``QUANTKIT_TEST_DEVICE=cuda`` (``scripts/gpu_check.py`` on a GPU machine) runs the same tests
with compiled kernels instead: TRITON_INTERPRET stays unset and tensors are created on the
GPU by default, so kernels, references and comparisons all run there.
"""

import os

_DEVICE = os.environ.get("QUANTKIT_TEST_DEVICE", "cpu")
if _DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"QUANTKIT_TEST_DEVICE must be cpu or cuda, got {_DEVICE!r}")
if _DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("QUANTKIT_TEST_DEVICE=cuda runs compiled kernels: unset TRITON_INTERPRET")
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if _DEVICE == "cuda":
    torch.set_default_device("cuda")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Loader of fresh float32 copies of a tiny Llama or OPT (``tiny_model("opt")``), each
    built once per session: ``quantkit.models.build_tiny_llama``/``build_tiny_opt``."""
    from quantkit import models

    root = tmp_path_factory.mktemp("tiny-models")
    builders = {"llama": models.build_tiny_llama, "opt": models.build_tiny_opt}
    paths: dict[str, object] = {}

    def load(kind: str = "llama") -> torch.nn.Module:
        if kind not in paths:
            paths[kind] = builders[kind](root / kind)
        return models.load_model(str(paths[kind]), torch.float32)[0]

    return load
