"""A method that cannot serve the pair, or more negatives than the data has, ends with one clear
line; --distill crd without weights runs with the published ones (the bad-input cases of
tests/engine/test_bad_input.py, with its files and fixtures)."""
from __future__ import annotations

import pytest

from tests.engine.test_bad_input import case_error, files, launcher, outcome  # noqa: F401  (fixtures)

launched = launcher({"fsp_channels", "nce_k", "crd_published"})


# 5. A method that cannot serve the pair.
@pytest.mark.parametrize("case, words", [
    ("fsp_channels", ["FSP", "same channel counts", "[16, 32, 64, 128]", "[16, 16, 32, 64]", "--distill"]),
    ("kdsvd_channels", ["KDSVD", "same channel counts", "[32, 64, 128]", "[16, 32, 64]", "--distill"]),
    ("hint_layer", ["--hint_layer 4", "student resnet8", "4 feature maps", "0 to 3"]),
    ("hint_layer_teacher", ["--hint_layer 4", "teacher resnet14", "4 feature maps", "0 to 3"]),
], ids=["fsp", "kdsvd", "hint_layer-student", "hint_layer-teacher"])
def test_method_that_cannot_serve_the_pair(case, words, outcome):
    case_error(outcome, case, *words)


# 6. More negatives than the data has: the largest usable K.
def test_nce_k_beyond_the_negatives_gives_the_largest_k(outcome):
    case_error(outcome, "nce_k", "--nce_k 100", "--nce_k 24 or less")


# 8. --distill crd without -a/-b is not an error: the published weights are printed, the run goes on.
def test_crd_without_weights_prints_published_ones_and_runs(outcome):
    result = outcome("crd_published")
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "error:" not in result.err
    assert "--distill crd: using its published weights -r 1 -a 0 -b 0.8" in result.out, result.out
