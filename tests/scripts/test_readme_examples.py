"""The README's Python examples run as written: "Using a loss in your own loop" trains one step
with CRD without argparse, and "Adding a method" registers a method that train_student.py then
trains with, its flag generated from its options."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datagen import SYNTHETIC

ROOT = Path(__file__).resolve().parents[2]
TINY = [*SYNTHETIC, "--epochs", "1"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A resnet8 with random weights for 4 classes, saved as RepDistiller saves a teacher."""
    from models import model_dict
    path = tmp_path_factory.mktemp("teacher") / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": model_dict["resnet8"](num_classes=4).state_dict()}, path)
    return path


def python_block(heading: str) -> str:
    """The first ```python block after the README's ``## heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {heading}'"
    return match.group(1)


@pytest.mark.e2e
def test_using_a_loss_in_your_own_loop_runs_and_trains():
    code = python_block("Using a loss in your own loop")
    assert "argparse" not in code and "opt" not in re.findall(r"\w+", code)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    crd, index = scope["crd"], scope["index"]
    assert math.isfinite(scope["loss"].item())
    assert crd.criterion.contrast.K == 4096 and crd.criterion.contrast.memory_v1.shape[0] == 50000
    # the step trained the heads and updated the bank rows of the batch, and only those
    assert all(p.grad is not None for p in crd.criterion.embed_s.parameters())
    bank = crd.criterion.contrast.memory_v1
    touched = torch.zeros(bank.shape[0], dtype=torch.bool)
    touched[index] = True
    norms = bank.norm(dim=1)
    assert torch.allclose(norms[touched], torch.ones(int(touched.sum())), rtol=1e-5)
    assert not torch.allclose(norms[~touched][:100], torch.ones(100), rtol=1e-3)  # untouched rows keep their init


@pytest.mark.e2e
def test_adding_a_method_registers_it_and_train_student_trains_with_it(tmp_path, teacher_ckpt):
    (tmp_path / "cosine_method.py").write_text(python_block("Adding a method"))
    driver = f"""
import sys, json
sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]
import train_student
import cosine_method  # noqa: F401  (registers --distill cosine)
help_text = train_student.build_parser().format_help()
assert "--cosine_scale" in help_text and "cosine feature matching (--distill cosine)" in help_text
results = train_student.main(sys.argv[1:])
print(json.dumps({{"last_acc": results["last_acc"], "terms": sorted(k for k in results["history"][0] if k.startswith("loss_"))}}))
"""
    argv = ["--path_t", str(teacher_ckpt), "--model_s", "resnet8", "--distill", "cosine", "--cosine_scale", "2",
            "--max_steps", "2", "--save_folder", str(tmp_path / "runs"), *TINY]
    out = subprocess.run([sys.executable, "-c", driver, *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["terms"] == ["loss_ce", "loss_cosine"]
    args = json.loads(next((tmp_path / "runs").glob("*/args.json")).read_text())
    assert args["cosine_scale"] == 2.0 and args["distill"] == "cosine"
    # out of range: the generated flag keeps the checked type
    bad = subprocess.run([sys.executable, "-c", driver, *argv[:-len(TINY)], "--cosine_scale", "-1", *TINY],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "argument --cosine_scale" in bad.stderr and "Traceback" not in bad.stderr
