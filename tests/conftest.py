"""Test-suite set-up: tests marked ``cuda`` are skipped, with the reason, where no CUDA GPU is visible."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run scripts/gpu_check.sh on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
