"""Views (dataset/views.py): Lab and gray conversions, layouts, both loaders giving the same
views, networks of 1 and 2 input channels, and cross-modal runs of the real scripts (teacher on L,
student on ab; a paired set's depth teacher and an rgb student)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.runtime import Runtime
from dataset import DataNeeds, DataOptions, get_dataloaders
from dataset.tensor_loader import tensor_source
from dataset.views import LAB_NORM, ToViews, ViewLayout, rgb_to_gray, rgb_to_lab, with_views
from distiller_zoo.step import DistillStep
from models import build_model, cifar_model_dict, in_channels_of, stem_conv
from models.teacher import checkpoint_view, load_teacher, prepare_teacher
import train_student
import train_teacher

pytestmark = pytest.mark.numeric
ROOT = Path(__file__).resolve().parents[2]
CPU = Runtime(torch.device("cpu"))
SMALL = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "4",
         "--batch_size", "8", "--device", "cpu", "--max_steps", "2", "--epochs", "1"]


def reference_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab of sRGB pixels [..., 3] in [0, 1], float64, as skimage.color.rgb2lab (CMC's
    conversion) computes it, written out: its gamma linearisation, its sRGB->XYZ matrix, its D65
    (2 degree) white point and its f(t) (threshold 0.008856, slope 7.787, + 16/116)."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz_from_rgb = np.array([[0.412453, 0.357580, 0.180423],
                             [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]])
    xyz = lin @ xyz_from_rgb.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    x, y, z = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116 * y - 16, 500 * (x - y), 200 * (y - z)], axis=-1)


def exact_cie_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab with the exact constants (the sRGB matrix to seven digits, (6/29)^3 and
    1 / (3 (6/29)^2)): what dataset/views.py computed before it took CMC's."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    t = lin @ matrix.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(t > delta ** 3, np.cbrt(t), t / (3 * delta ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def normalise_lab(lab: np.ndarray) -> np.ndarray:
    """CMC's normalisation of Lab [..., 3]: (lab - mean) / std per channel."""
    return (lab - np.array([m for m, _ in LAB_NORM])) / np.array([s for _, s in LAB_NORM])


def uint8_images() -> torch.Tensor:
    """uint8 images [8, 3, 32, 32]: every level 0..255 as a gray and as a pure red, the 8 corners of
    the gamut, and
    random pixels."""
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[0, :, :8] = torch.arange(256, dtype=torch.uint8).view(8, 32)  # grays: each level in each channel
    images[1, 0, :8] = torch.arange(256, dtype=torch.uint8).view(8, 32)  # pure reds: each level
    images[1, 1:, :8] = 0
    corners = torch.tensor([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=torch.uint8)
    images[2, :, 0, :8] = corners.T
    return images


def test_lab_is_cmcs_skimage_conversion():
    """Our Lab and its normalised L/ab views equal skimage's rgb2lab of the same uint8 images (what
    CMC feeds its network) to float32 rounding, in both pipelines' input (uint8 / 255 as float32)."""
    images = uint8_images()
    rgb = images.float() / 255          # ToTensor and the tensor loader both give this
    ref = reference_lab(images.double().permute(0, 2, 3, 1).numpy() / 255)   # skimage: img_as_float, float64
    lab = rgb_to_lab(rgb)
    assert lab.dtype == torch.float32 and lab.shape == rgb.shape
    got = lab.double().permute(0, 2, 3, 1).numpy()
    assert np.abs(got - ref).max() <= 2e-5           # measured 7e-6: float32 inputs and outputs of values to 100
    # the views, normalised in float64 and cast: CMC's inputs to ~1e-7 (measured 6.4e-8)
    views = ViewLayout(("L", "ab")).make(rgb, (0.5,) * 3, (0.25,) * 3)
    assert views.dtype == torch.float32
    want = normalise_lab(ref)
    assert np.abs(views.double().permute(0, 2, 3, 1).numpy() - want).max() <= 2e-7
    # the exact CIE constants move the views by up to 4.8e-5: far outside that tolerance
    assert np.abs(normalise_lab(exact_cie_lab(images.double().permute(0, 2, 3, 1).numpy() / 255)) - want).max() > 4e-5
    # known values of skimage's rgb2lab: white is not exactly a = b = 0 with its constants, sRGB red
    np.testing.assert_allclose(ref[2, 0, 7], [100, -0.002455, 0.004653], atol=1e-6)
    np.testing.assert_allclose(ref[2, 0, 4], [53.240588, 80.092308, 67.202751], atol=1e-6)
    # CMC's normalisation constants: the extremes of a and b over the gamut's corners with these constants (green,
    # magenta; blue, yellow), which the exact constants do not give (a max 98.234, b min -107.860)
    corners = reference_lab(np.array([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)], dtype=np.float64))
    a_range, b_range = (-86.183, 98.233), (-107.857, 94.478)
    assert (round(corners[:, 1].min(), 3), round(corners[:, 1].max(), 3)) == a_range
    assert (round(corners[:, 2].min(), 3), round(corners[:, 2].max(), 3)) == b_range
    assert LAB_NORM[1] == ((a_range[0] + a_range[1]) / 2, (a_range[1] - a_range[0]) / 2)
    assert LAB_NORM[2] == ((b_range[0] + b_range[1]) / 2, (b_range[1] - b_range[0]) / 2)
    # the normalisation of each channel: L (lab - 50) / 50, a and b with CMC's centres and half-ranges
    for c in range(3):
        mean, std = LAB_NORM[c]
        torch.testing.assert_close(views[:, c], (lab[:, c] - mean) / std, rtol=1e-6, atol=1e-6)


def test_gray_view_is_luma_with_combined_normalisation():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(rgb_to_gray(rgb)[:, 0], luma)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    gray = ViewLayout(("gray",)).make(rgb, mean, std)
    expected = (luma - (0.299 * 0.5 + 0.587 * 0.4 + 0.114 * 0.3)) / (0.299 * 0.2 + 0.587 * 0.25 + 0.114 * 0.3)
    assert gray.shape == (2, 1, 8, 8)
    torch.testing.assert_close(gray[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_layout_slices_and_channels():
    layout = ViewLayout(("rgb", "L", "ab", "paired:depth", "gray"), sources=(("rgb", 3), ("depth", 1)))
    assert [layout.channels(v) for v in layout.views] == [3, 1, 2, 1, 1]
    assert [layout.slice(v) for v in layout.views] == [slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 7),
                                                       slice(7, 8)]
    assert layout.total == 8 and layout.source_channels == 4 and not layout.plain and ViewLayout().plain
    images = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    out = layout.make(images, mean, std)
    assert out.shape == (2, 8, 6, 6)
    rgb = (images[:, :3] - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out[:, 0:3], rgb)
    torch.testing.assert_close(out[:, 6], (images[:, 3] - 0.5) / 0.5)
    with pytest.raises(UserError, match="paired"):
        ViewLayout(("paired:depth",))          # no depth channels in RGB images
    with pytest.raises(UserError, match="not a view"):
        ViewLayout(("hsv",))


def test_both_loaders_give_the_same_views():
    """For the same sample and the same crop/flip, the torchvision transform (ToViews after
    ToTensor) and the tensor pipeline give the same concatenated views."""
    opts = DataOptions(dataset="synthetic", synthetic_classes=4, synthetic_train=4, synthetic_test=2, batch_size=4,
                       seed=3)
    needs = DataNeeds(views=("L", "ab"))
    tensor = get_dataloaders(opts, needs)
    folder = get_dataloaders(DataOptions(**{**vars(opts), "loader": "torchvision"}), needs)
    assert tensor.layout.views == ("L", "ab") and folder.layout.views == ("L", "ab")
    # validation (no augmentation): batch for batch
    for (a, ya), (b, yb) in zip(tensor.val_loader, folder.val_loader):
        assert a.shape == b.shape == (4, 3, 32, 32)
        assert torch.equal(ya, yb)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # training: the tensor loader's crop and flip of position 0, replayed through the test transform
    loader = tensor.train_loader
    top, left, flip = loader.epoch_params(0)
    index = next(iter(loader))[0]
    order = list(loader.sampler)
    raw = torch.as_tensor(loader.dataset.base.data[order[0]]).permute(2, 0, 1)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    crop = padded[:, top[0]:top[0] + 32, left[0]:left[0] + 32]
    crop = crop.flip(2) if flip[0] else crop
    transform = with_views(loader.dataset.base.transform, ("L", "ab"))
    to_views = transform.transforms[-1]
    assert isinstance(to_views, ToViews) and tensor_source(loader.dataset.base).views is not None
    expected = to_views(crop.float() / 255)
    torch.testing.assert_close(index[0], expected, rtol=1e-6, atol=1e-6)


def test_rgb_alone_is_todays_pipeline():
    opts = DataOptions(dataset="synthetic", synthetic_classes=4, synthetic_train=4, synthetic_test=2, batch_size=4,
                       seed=3)
    plain, rgb = get_dataloaders(opts), get_dataloaders(opts, DataNeeds(views=("rgb",)))
    assert rgb.layout.plain and tensor_source(rgb.train_loader.dataset.base).views is None
    for (a, _), (b, _) in zip(plain.train_loader, rgb.train_loader):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(cifar_model_dict))
def test_every_cifar_model_takes_1_and_2_channels(name):
    reference = build_model(name, num_classes=5)
    keys = {k: v.shape for k, v in reference.state_dict().items()}
    stem, _ = stem_conv(reference)
    for channels in (1, 2):
        model = build_model(name, num_classes=5, in_channels=channels).eval()
        assert in_channels_of(model) == channels
        state = model.state_dict()
        assert state.keys() == keys.keys()
        assert all(state[k].shape == s for k, s in keys.items() if k != f"{stem}.weight")
        with torch.no_grad():
            feats, logits = model(torch.randn(2, channels, 32, 32), is_feat=True)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all() and len(feats) >= 2


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_fast_teacher_path_with_one_channel(name):
    model = build_model(name, num_classes=5, in_channels=1).eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(x)
        fast = prepare_teacher(model, CPU, x[:2], fast=True)
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.e2e
def test_L_teacher_ab_student_runs_reload_and_leave_the_teacher_alone(tmp_path):
    teacher_run = train_teacher.main(["--model", "resnet8", "--view", "L", *SMALL,
                                      "--save_folder", str(tmp_path / "t")])
    assert teacher_run["last_acc"] is not None
    path_t = next((tmp_path / "t").glob("*/resnet8_last.pth"))
    state = torch.load(path_t, weights_only=True)
    assert state["view"] == "L" and checkpoint_view(state) == "L"
    teacher, arch = load_teacher(str(path_t), num_classes=4, dataset="synthetic")
    assert (arch, teacher.input_view, in_channels_of(teacher)) == ("resnet8", "L", 1)
    for method in ("crd", "kd"):
        argv = ["--path_t", str(path_t), "--model_s", "resnet8", "--view_s", "ab", "--distill", method,
                "--nce_k", "8", *SMALL, "--save_folder", str(tmp_path / "s")]
        train_student.main(argv)
        saved = next((tmp_path / "s").glob(f"*_{method}_*view_s:ab_view_t:L*/resnet8_last.pth"))
        student, _ = load_teacher(str(saved), num_classes=4, dataset="synthetic")
        assert (student.input_view, in_channels_of(student)) == ("ab", 2)
    # an explicit --view_t that contradicts the checkpoint
    with pytest.raises(UserError, match="contradicts"):
        train_student.build_run(train_student.parse_option(argv[:-2] + ["--view_t", "ab", "--save_folder",
                                                                         str(tmp_path / "x")]), CPU)
    # one step: gradients never reach the teacher, which sees the L channel while the student sees ab
    opt = train_student.parse_option(["--path_t", str(path_t), "--view_s", "ab", "--distill", "crd", "--nce_k", "8",
                                      *SMALL])
    parts = train_student.build_run(opt, CPU)
    assert parts.input_s == slice(0, 2) and parts.inputs_t == [slice(2, 3)]  # the student's view first
    teacher = parts.teachers[0][0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    step: DistillStep = parts.step
    step.train()
    _, _, terms = step(next(iter(parts.data.train_loader)))
    sum(terms.values()).backward()
    parts.optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(p.grad is not None for p in parts.student.parameters())


def write_paired(root: Path, classes: int = 2, per_class: int = 6, test_per_class: int = 2) -> Path:
    """A paired set: rgb/ (RGB PNGs) and depth/ (grayscale PNGs) of the same 32x32 samples."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            for i in range(count):
                rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                rgb[:, :, c % 3] = 200  # a class signal
                depth = (rgb.astype(np.float64).mean(axis=2)).astype(np.uint8)
                for folder, image in (("rgb", Image.fromarray(rgb)), ("depth", Image.fromarray(depth, mode="L"))):
                    (root / folder / split / f"class{c}").mkdir(parents=True, exist_ok=True)
                    image.save(root / folder / split / f"class{c}" / f"img{i}.png")
    return root


@pytest.mark.e2e
def test_paired_depth_teacher_rgb_student(tmp_path):
    data = write_paired(tmp_path / "paired")
    paired = ["--dataset", "paired", "--data_folder", str(data), "--batch_size", "4", "--device", "cpu",
              "--max_steps", "2", "--epochs", "1"]
    bundle = get_dataloaders(DataOptions(dataset="paired", data_folder=str(data), batch_size=4, seed=0),
                             DataNeeds(views=("rgb", "paired:depth")))
    img, target = next(iter(bundle.train_loader))
    assert img.shape == (4, 4, 32, 32) and bundle.layout.slice("paired:depth") == slice(3, 4)
    assert bundle.n_data == 12 and bundle.num_classes == 2
    # the depth channel is the mean of the rgb ones (as written), cropped and flipped alike
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    rgb = img[:, :3] * std + mean
    depth = img[:, 3] * 0.5 + 0.5
    assert (rgb.mean(1) - depth).abs().max() <= 1.5 / 255
    train_teacher.main(["--model", "resnet8", "--view", "paired:depth", *paired, "--save_folder", str(tmp_path / "t")])
    path_t = next((tmp_path / "t").glob("*/resnet8_last.pth"))
    results = train_student.main(["--path_t", str(path_t), "--model_s", "resnet8", "--distill", "kd", *paired,
                                  "--save_folder", str(tmp_path / "s")])
    assert results["last_acc"] is not None
    assert next((tmp_path / "s").glob("*view_s:rgb_view_t:paired:depth*/resnet8_last.pth"))
    # a missing partner file: one line naming it, exit 2
    (data / "depth" / "train" / "class1" / "img3.png").unlink()
    out = subprocess.run([sys.executable, "train_teacher.py", "--model", "resnet8", "--view", "paired:depth", *paired,
                          "--save_folder", str(tmp_path / "t2")], cwd=ROOT, capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "depth/train/class1/img3" in lines[0] and "Traceback" not in out.stderr


def test_ensemble_of_teachers_on_different_views(tmp_path):
    """Teachers on L (recorded) and rgb (a checkpoint without a view, as RepDistiller's), a gray
    student: the batches carry gray, L and rgb, each network its channels; a 1-channel
    checkpoint without a view needs --view_t."""
    folder = tmp_path / "resnet8_vanilla"
    folder.mkdir()
    torch.save({"model": build_model("resnet8", 4, in_channels=1).state_dict(), "arch": "resnet8", "view": "L"},
               folder / "l.pth")
    torch.save({"model": build_model("resnet8", 4).state_dict()}, folder / "rgb.pth")
    torch.save({"model": build_model("resnet8", 4, in_channels=1).state_dict()}, folder / "unknown.pth")
    base = ["--model_s", "resnet8", "--view_s", "gray", "--distill", "kd", *SMALL]
    opt = train_student.parse_option(["--path_t", f"{folder / 'l.pth'},{folder / 'rgb.pth'}", *base])
    parts = train_student.build_run(opt, CPU)
    assert parts.data.layout.views == ("gray", "L", "rgb") and parts.views_t == ["L", "rgb"]
    assert parts.input_s == slice(0, 1) and parts.inputs_t == [slice(1, 2), slice(2, 5)]
    img = next(iter(parts.data.train_loader))[0]
    assert img.shape[1] == 5
    parts.step.train()
    logits, _, terms = parts.step(next(iter(parts.data.train_loader)))
    assert logits.shape == (8, 4) and torch.isfinite(sum(terms.values()))
    accs = train_student.validate_teachers(parts, CPU)
    assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)
    with pytest.raises(UserError, match="records no view"):
        train_student.build_run(train_student.parse_option(["--path_t", str(folder / "unknown.pth"), *base]),
                                CPU)
    parts = train_student.build_run(train_student.parse_option(["--path_t", str(folder / "unknown.pth"),
                                                                "--view_t", "L", *base]), CPU)
    assert parts.views_t == ["L"] and parts.data.layout.views == ("gray", "L")
    with pytest.raises(UserError, match="2 views for 1 teachers"):
        train_student.build_run(train_student.parse_option(["--path_t", str(folder / "l.pth"), "--view_t", "L,rgb",
                                                            *base]), CPU)
