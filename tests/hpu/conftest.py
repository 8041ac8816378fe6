"""tests/hpu run only where Habana's PyTorch bridge and a Gaudi are present: ``python -m pytest tests/hpu``."""

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("habana_frameworks") is not None:
        return
    skip = pytest.mark.skip(reason="needs a Gaudi and habana_frameworks (run inside docker/Dockerfile.gaudi)")
    for item in items:
        if "tests/hpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
