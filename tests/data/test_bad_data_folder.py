"""A data folder without data ends with one clear line saying how to get the data (the bad-input
cases of tests/engine/test_bad_input.py, with its files and fixtures)."""
from __future__ import annotations

import pytest

from tests.engine.test_bad_input import case_error, files, launcher, outcome  # noqa: F401  (fixtures)

launched = launcher({"cifar100_empty"})


# 4. A data folder without data: say how to get the data.
@pytest.mark.parametrize("case, words", [
    ("cifar100_empty", ["CIFAR-100 not found", "--download", "cifar-100-python"]),
    ("imagenet_empty", ["train/<class>/*.JPEG", "val/<class>/*.JPEG", "--data_folder"]),
], ids=["cifar100", "imagenet"])
def test_data_folder_without_data_says_how_to_get_it(case, words, outcome, files):
    case_error(outcome, case, str(files.empty), *words)
