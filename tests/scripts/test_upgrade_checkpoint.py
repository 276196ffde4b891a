"""scripts/upgrade_checkpoint.py: older checkpoints (numpy random states) are converted; a file that
loads but is not one is refused with one line, exit status 2, and left byte for byte as it was."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.runtime import set_rng_state
from scripts import upgrade_checkpoint


def old_rng() -> dict:
    """The random states of one process as versions before 0.2 wrote them (numpy's own tuples)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def old_checkpoint(rng: dict | None = None, **entries) -> dict:
    rank = {"rng": old_rng() if rng is None else rng, "loader": None}
    return {"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 1,
            "resume": {"world_size": 1, "per_rank": [rank]}, **entries}


def bad_rng(**changes) -> dict:
    rng = {**old_rng(), **changes}
    return {k: v for k, v in rng.items() if v is not None}


MALFORMED = {  # what torch.save writes -> what the one line says
    "list": ([np.random.get_state()], "it holds a list, not a checkpoint dict"),
    "plain_list": ([1, 2], "it holds a list, not a checkpoint dict"),   # loads without numpy: not 'already current'
    "no_resume": ({"model": {}, "state": np.random.get_state()}, "it has no 'resume' entry"),
    "resume_list": ({"resume": [np.random.get_state()]}, "its 'resume' entry is a list, not a dict"),
    "no_per_rank": ({"resume": {"state": np.zeros(3, np.uint32)}}, "its 'resume' entry has no 'per_rank'"),
    "per_rank_dict": ({"resume": {"per_rank": {"0": {"rng": old_rng()}}}},
                      "its resume['per_rank'] is a dict, not a list"),
    "per_rank_empty": ({"resume": {"per_rank": []}, "x": np.zeros(3, np.uint32)}, "its resume['per_rank'] is empty"),
    "rank_tuple": ({"resume": {"per_rank": [np.random.get_state()]}}, "resume['per_rank'][0] is a tuple, not a dict"),
    "no_rng": (old_checkpoint(resume={"per_rank": [{"loader": np.zeros(3, np.uint32)}]}),
               "resume['per_rank'][0] has no 'rng' entry"),
    "rng_str": (old_checkpoint(rng="MT19937", x=np.zeros(3, np.uint32)),
                "resume['per_rank'][0]['rng'] is a str, not a dict"),
    "python_state_short": (old_checkpoint(bad_rng(python=(3, (1, 2), None))),
                           "resume['per_rank'][0]['rng'] is not a random state RepDistill wrote (ValueError"),
    "python_state_not_tuple": (old_checkpoint(bad_rng(python=7)), "is not a random state RepDistill wrote (TypeError"),
    "numpy_keys_short": (old_checkpoint(bad_rng(numpy=("MT19937", np.zeros(10, np.uint32), 0, 0, 0.0))),
                         "is not a random state RepDistill wrote ("),   # the error depends on numpy's version
    "no_torch_state": (old_checkpoint(bad_rng(torch=None)), "(KeyError: no 'torch' entry)"),
    "numpy_elsewhere": (old_checkpoint(extra=np.zeros(3, np.uint32)), "it holds numpy."),
    "other_numpy": (old_checkpoint(extra=np.zeros(3)), "it holds numpy.dtypes.Float64DType, which is never read"),
    "not_a_checkpoint": (None, "it cannot be read (RuntimeError: "),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_file_is_refused_in_one_line_and_left_as_it_is(case, tmp_path, capsys):
    content, expected = MALFORMED[case]
    path = tmp_path / "last.pth"
    if content is None:
        path.write_bytes(b"PK\x03\x04 half a zip")
    else:
        torch.save(content, path)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as stop:
        upgrade_checkpoint.main([str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: '{path}' "), err
    assert expected in err and err.rstrip().endswith("the file was left as it is"), err
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no .orig, no temp


def test_an_older_file_is_upgraded_and_its_random_states_restore(tmp_path, capsys):
    rng = old_rng()
    draws = (random.random(), np.random.rand(), torch.rand(1))
    path = tmp_path / "last.pth"
    torch.save(old_checkpoint(rng), path)
    assert upgrade_checkpoint.main([str(path)]) == 0 and "upgraded" in capsys.readouterr().out
    state = load_checkpoint(path)   # weights_only, no numpy allowed
    set_rng_state(state["resume"]["per_rank"][0]["rng"])
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    assert torch.load(path.with_name("last.pth.orig"), weights_only=False)["epoch"] == 1   # the original, kept
    assert upgrade_checkpoint.main([str(path)]) == 0 and "already current" in capsys.readouterr().out
