"""Convert checkpoints written by RepDistill before version 0.2 (numpy random states inside, which
``torch.load(weights_only=True)`` refuses) into the current format (tensors and plain types only).

    python scripts/upgrade_checkpoint.py save/models/<run>/last.pth [more files ...]

Each file is read with ``weights_only=True`` and numpy's array types allowed (still no code can
run), its random states are stored as tensors, and it is written back atomically; the original is
kept beside it as ``<file>.orig``. Files already in the current format are left alone.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helper.checkpoint import save_checkpoint  # noqa: E402
from helper.errors import UserError, exit_on_user_error  # noqa: E402
from helper.runtime import plain_rng_states  # noqa: E402

try:  # numpy 2; numpy 1 names the module numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

# numpy arrays, as the random states of older checkpoints hold them
NUMPY_ARRAY_TYPES = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


def tensor_rng(state: dict) -> dict:
    """A ``helper.runtime.rng_state`` dict of the older format (Python and numpy states as their
    own tuples) in the current one (tensors and numbers)."""
    if isinstance(state.get("python"), dict):
        return state
    return {**state, **plain_rng_states(state["python"], state["numpy"])}


def upgrade(path: Path) -> bool:
    """Rewrite ``path`` in the current format; False when it already is."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return False
    except Exception:  # noqa: BLE001 - any refusal: try with numpy's array types allowed
        pass
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_TYPES):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"'{path}' is not an older RepDistill checkpoint that can be upgraded ({err.__class__.__name__}: "
                        f"{str(err).strip().splitlines()[-1][:200]})") from None
    for rank in state.get("resume", {}).get("per_rank", []):
        rank["rng"] = tensor_rng(rank["rng"])
    shutil.copy2(path, path.with_name(path.name + ".orig"))
    save_checkpoint(state, path)
    torch.load(path, map_location="cpu", weights_only=True)  # now loads as every checkpoint must
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="checkpoints to convert in place")
    args = parser.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            raise UserError(f"'{path}' does not exist")
        print(f"{path}: {'upgraded (original kept as ' + path.name + '.orig)' if upgrade(path) else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
