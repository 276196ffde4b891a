"""The CUDA paths against the CPU (every test marked ``cuda``: skipped without a GPU; run by
scripts/gpu_check.sh): the tensor data pipeline on the device, the memory bank's scores in both
modes, the prepared (folded) teacher, bf16 and fp16 autocast with the loss scaler, a training
run of train_student.py, and the NCCL all-gather of the banks under torchrun.

Each test mirrors a CPU test that passes on every machine (named in its docstring) and reuses
its helpers. TF32 is off in every test: CUDA's float32 products then compute in float32, as the
CPU's do, and the CPU tests' float32 tolerances apply.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.runtime import Runtime
from crd import ContrastLoss, ContrastMemory
from crd.crcd import relation_scores_from_bank
from dataset.sampling import ContrastSampler
from distiller_zoo.registry import Batch
from engine.methods import method_names
from models import build_model
from models.teacher import prepare_teacher
from tests.methods.test_amp import GRAD_COSINE, check_method_under_autocast, make_setup
from tests.methods.test_contrast_fast import BATCH, DIM, contrast_idx, crcd_case
from tests.models.test_fast_teacher import all_outputs, assert_outputs_close, input_size, randomize_batchnorm
from tests.data.test_tensor_loader import all_batches, make_loader, random_images
from tests.tolerance import AMP, FP32, FP32_DEEP, FP32_EXACT, assert_close
import train_student
import train_teacher

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def float32_kernels():
    """TF32 off (matmuls and cuDNN convolutions in float32) and cuDNN's heuristic algorithm
    choice (a training run in this process turns autotuning on); restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


def on(device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


# --- the tensor data pipeline (tests/data/test_tensor_loader.py) --------------------------------------

def test_tensor_loader_on_cuda_gives_the_cpu_batches():
    """Same seed: the same images, labels and indices on the GPU as on the CPU (the crops and
    flips are drawn on the CPU); the negatives, drawn by a CUDA generator, are valid and the same
    on every pass."""
    images, labels = random_images(60, seed=5), [i % 6 for i in range(60)]
    label_tensor = torch.tensor(labels)
    passes = {}
    for device in ("cpu", "cuda", "cuda"):
        loader = make_loader(images, labels, batch_size=16, contrast=ContrastSampler(label_tensor, 12, "relax"),
                             device=device)
        loader.sampler.set_epoch(2)
        passes.setdefault(device, []).append(all_batches(loader))
    cpu, (gpu, gpu_again) = passes["cpu"][0], passes["cuda"]
    assert len(cpu) == len(gpu) == 4
    for (img_c, target_c, index_c, _), (img_g, target_g, index_g, contrast_g) in zip(cpu, gpu):
        assert img_g.device.type == "cuda" and contrast_g.device.type == "cuda"
        assert_close(img_g, img_c, rtol=FP32_EXACT)  # the same uint8 pixels, normalised
        assert torch.equal(target_g.cpu(), target_c) and torch.equal(index_g.cpu(), index_c)
        contrast_g, target = contrast_g.cpu(), target_c
        assert contrast_g.shape == (len(index_c), 13)
        assert torch.equal(label_tensor[contrast_g[:, 0]], target)                 # relax: a positive of the class
        assert not (label_tensor[contrast_g[:, 1:]] == target[:, None]).any()      # negatives of other classes
        assert (contrast_g[:, 1:].sort(1).values.diff(dim=1) > 0).all()           # distinct
    for a, b in zip(gpu, gpu_again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- the memory bank's scores (tests/methods/test_contrast_fast.py) -----------------------------------

@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_memory_bank_on_cuda_equals_the_cpu(mode):
    """Scores, NCE loss, gradients, Z and the updated banks over two steps, GPU against CPU."""
    torch.manual_seed(0)
    n_data, k = 5000, 400
    memories = {"cpu": ContrastMemory(DIM, n_data, k, score_mode=mode)}
    memories["cuda"] = copy.deepcopy(memories["cpu"]).to(CUDA)
    criterion = ContrastLoss(n_data)
    for step in range(2):
        y = torch.randperm(n_data)[:BATCH]  # distinct anchors: a CUDA index_copy_ of repeats has no fixed order
        idx = contrast_idx(y, n_data, k, relax=False, seed=step)
        v1, v2 = F.normalize(torch.randn(2, BATCH, DIM), dim=2)
        results = {}
        for device, memory in memories.items():
            a, b = (v.to(device).requires_grad_(True) for v in (v1, v2))
            out_v1, out_v2 = memory(a, b, *on(device, y, idx))
            loss = criterion(out_v1) + criterion(out_v2)
            loss.backward()
            results[device] = dict(out_v1=out_v1, out_v2=out_v2, loss=loss, grad_v1=a.grad, grad_v2=b.grad,
                                   params=memory.params.clone(), memory_v1=memory.memory_v1.clone(),
                                   memory_v2=memory.memory_v2.clone())
        for name, value in results["cuda"].items():
            assert value.device.type == "cuda", name
            assert_close(value, results["cpu"][name], rtol=FP32, msg=f"{mode} {name}, step {step}")


@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_crcd_relation_scores_on_cuda_equal_the_cpu(mode):
    """CRCD's relation scores from the bank and their gradients, GPU against CPU."""
    torch.manual_seed(3)
    memory = ContrastMemory(DIM, 600, 80)
    memory.memory_v2.mul_(torch.rand(600, 1))  # rows not unit
    idx, contrast = crcd_case(600, 80, seed=0)
    e = F.normalize(torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(5)), dim=1)
    results = []
    for device in ("cpu", "cuda"):
        bank_memory = copy.deepcopy(memory).to(device)
        leaf = e.to(device).requires_grad_(True)
        cos = relation_scores_from_bank(bank_memory, leaf, "memory_v2", *on(device, idx, contrast), mode=mode)
        weights = torch.randn(cos.shape, generator=torch.Generator().manual_seed(6)).to(device)
        (cos * weights).sum().backward()
        results.append((cos, leaf.grad))
    for got, expected in zip(results[1], results[0]):
        assert_close(got, expected, rtol=FP32)


# --- the prepared teacher (tests/models/test_fast_teacher.py) -----------------------------------------

@pytest.mark.parametrize("name", ["resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1", "ResNet50"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_prepared_teacher_on_cuda_equals_the_cpu_network(name, channels_last):
    """prepare_teacher on the GPU (BatchNorm folded, channels_last weights) gives the outputs of
    the unfolded network on the CPU, up to the rounding of a whole network."""
    torch.manual_seed(0)
    size = input_size(name)
    model = randomize_batchnorm(build_model(name, num_classes=10), size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = all_outputs(model, x)
    runtime = Runtime(CUDA, channels_last=channels_last)
    prepared = prepare_teacher(copy.deepcopy(model), runtime, runtime.to_device(x[:1]))
    assert next(prepared.parameters()).device.type == "cuda" and not prepared.training
    got = all_outputs(prepared, runtime.to_device(x))
    assert_outputs_close(got, expected, FP32_DEEP, f"{name} channels_last={channels_last}")


# --- mixed precision (tests/methods/test_amp.py) --------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_amp_setup():
    student, teacher, batch = make_setup()
    batch = Batch(*on(CUDA, batch.img, batch.target, batch.index, batch.contrast_idx))
    return student.to(CUDA), teacher.to(CUDA), batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", method_names())
def test_method_under_cuda_autocast(method, dtype, cuda_amp_setup):
    """Every method's terms under bf16 and fp16 autocast on the GPU: float32, finite, within the
    README's bounds of fp32 (2%, RKD 6%), gradients aligned with fp32's."""
    check_method_under_autocast(method, *cuda_amp_setup, dtype)


def test_fp16_step_with_the_grad_scaler_follows_the_fp32_step():
    """One SGD step under fp16 autocast with Runtime's GradScaler: the loss within AMP of fp32,
    no overflow (the scale is kept), finite weights, an update aligned with fp32's."""
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10).to(CUDA).train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 32, 32, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_fp32 = F.cross_entropy(reference(x), y)
    loss_fp32.backward()
    optimizer.step()

    runtime = Runtime(CUDA, amp="fp16")
    scaler = runtime.grad_scaler()
    assert scaler.is_enabled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with runtime.autocast():
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale  # no inf or NaN gradient: the step was taken and the scale kept
    assert_close(loss.float(), loss_fp32, rtol=AMP)
    step_fp16 = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    step_fp32 = torch.cat([p.detach().flatten() for p in reference.parameters()]) - before
    assert torch.isfinite(step_fp16).all() and step_fp16.abs().sum() > 0
    assert F.cosine_similarity(step_fp16, step_fp32, dim=0) > GRAD_COSINE


# --- train_student.py on the GPU (tests/engine/test_speed_flags.py::test_bf16_step_is_close_to_fp32) ------

DATA = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "4",
        "--batch_size", "8", "--num_workers", "0"]


@pytest.fixture(scope="module")
def cuda_teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cuda_teacher")
    results = train_teacher.main(["--model", "resnet8", *DATA, "--device", "cuda", "--epochs", "1", "--max_steps", "4",
                                  "--save_folder", str(folder)])
    assert results["status"] == "stopped" and results["steps"] == 4  # --max_steps inside epoch 1
    return next(folder.glob("*/resnet8_last.pth"))


def test_train_student_crd_on_cuda(cuda_teacher, tmp_path):
    """train_student.py --device cuda (tensor loader on the GPU, folded teacher, memory bank):
    the first step's CE and KD equal the CPU run's (same weights and images), CRD's is finite
    (its negatives come from a CUDA generator); bf16 and fp16 stay within AMP of fp32; a
    3-step run finishes."""
    args = ["--path_t", str(cuda_teacher), "--model_s", "resnet8", "--distill", "crd", "--nce_k", "16",
            *DATA, "--epochs", "1", "-a", "1", "-b", "0.8", "--deterministic"]
    runs = {}
    for name, flags in [("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda"]),
                        ("bf16", ["--device", "cuda", "--amp", "bf16"]), ("fp16", ["--device", "cuda", "--amp", "fp16"])]:
        result = train_student.main(args + flags + ["--max_steps", "1", "--save_folder", str(tmp_path / name)])
        assert result["status"] == "stopped" and result["steps"] == 1, name
        runs[name] = result["history"][0]
        assert all(math.isfinite(runs[name][key]) for key in ("loss_ce", "loss_kd", "loss_crd")), (name, runs[name])
    for key in ("loss_ce", "loss_kd"):
        assert_close(runs["cuda"][key], runs["cpu"][key], rtol=FP32_DEEP, msg=key)
    for amp in ("bf16", "fp16"):
        for key in ("loss_ce", "loss_kd", "loss_crd"):
            assert_close(runs[amp][key], runs["cuda"][key], rtol=AMP, msg=f"{amp} {key}")
    longer = train_student.main(args + ["--device", "cuda", "--max_steps", "3", "--save_folder", str(tmp_path / "long")])
    assert longer["status"] == "stopped" and longer["steps"] == 3
    assert math.isfinite(longer["history"][0]["loss_crd"])


# --- NCCL (tests/engine/test_distributed.py) ----------------------------------------------------------

def test_nccl_all_gather_of_the_banks_under_torchrun(tmp_path):
    """tests/cuda_nccl_worker.py under torchrun with one process: the NCCL process group, the
    collectives of common/distributed.py and the memory bank's gathered update (forced on in a
    world of one) give what the single-process path gives."""
    out = tmp_path / "nccl.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "tests.cuda_nccl_worker", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    report = json.loads(out.read_text())
    assert report["backend"] == "nccl" and report["world_size"] == 1
    assert report["checks"] and all(report["checks"].values()), report["checks"]
