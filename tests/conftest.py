"""Test-wide setup: Triton kernels run in the interpreter, the hub is never contacted.

TRITON_INTERPRET must be set before any module that defines a ``@triton.jit`` kernel is
imported, so it is set here at import time of the test session (pytest imports conftest
first). The Makefile and .ci/run set the same variables.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
