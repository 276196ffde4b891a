"""Test-suite set-up: tests marked ``cuda`` are skipped, with the reason, where no CUDA GPU is visible;
fixtures shared by every folder: ``teacher``, one tiny trained teacher per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.datagen import SYNTHETIC
import train_teacher


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run scripts/gpu_check.sh on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A resnet8 trained for one epoch on the ``SYNTHETIC`` set by train_teacher.py, once per session:
    its ``resnet8_last.pth`` (the rest of its run folder beside it). Shared by every test that asks
    for it: read it, never change it (copy it into ``tmp_path`` first)."""
    folder = tmp_path_factory.mktemp("teacher")
    train_teacher.main(["--model", "resnet8", *SYNTHETIC, "--epochs", "1", "--save_folder", str(folder)])
    return next(folder.glob("*/resnet8_last.pth"))
