"""Tests that need a CUDA device: every test here is marked `gpu` and skipped without CUDA.

python -m pytest -q -m gpu tests/gpu        # on a GPU machine (bench/gpu/acceptance.sh runs it)
"""

import pytest
import torch


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
