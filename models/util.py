"""Helper modules that distillers train alongside the student (RepDistiller's ``models/util.py``).

Class names, constructor signatures, parameter names and computations are RepDistiller's, so the
state dicts of modules built there load here with ``strict=True``:

- :class:`ConvReg` -- FitNet's convolutional regressor (Romero et al., "FitNets", ICLR 2015).
- :class:`Connector` -- AB's connectors (Heo et al., "Knowledge Transfer via Distillation of
  Activation Boundaries Formed by Hidden Neurons", AAAI 2019).
- :class:`ConnectorV2` -- 1x1 conv + BN connectors (Heo et al., "A Comprehensive Overhaul of
  Feature Distillation", ICCV 2019).
- :class:`Paraphraser`, :class:`Translator` -- FT (Kim et al., "Paraphrasing Complex Network:
  Network Compression via Factor Transfer", NeurIPS 2018).
- :class:`Regress`, :class:`Embed`, :class:`LinearEmbed`, :class:`MLPEmbed`, :class:`PoolEmbed`,
  :class:`Normalize`, :class:`Flatten` -- small heads on pooled features (CRD, CC, ...).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvReg",
    "Connector",
    "ConnectorV2",
    "Paraphraser",
    "Translator",
    "Regress",
    "Embed",
    "LinearEmbed",
    "MLPEmbed",
    "PoolEmbed",
    "Normalize",
    "Flatten",
]

Shape = Sequence[int]


def _maybe_bn(channels: int, use_bn: bool) -> nn.Module:
    """A BatchNorm2d, or a parameter-free placeholder that keeps the Sequential's indices."""
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class ConvReg(nn.Module):
    """FitNet regressor: maps a student map [B, C_s, H_s, W_s] to the teacher's [B, C_t, H_t, W_t].

    ``conv`` is a 3x3 stride-2 conv if H_s == 2 H_t, a 4x4 stride-2 transposed conv if 2 H_s == H_t,
    otherwise (H_s >= H_t) a conv with kernel (1 + H_s - H_t, 1 + W_s - W_t); then ``bn`` and,
    if ``use_relu``, a ReLU. Shapes are [N, C, H, W] (N is ignored).
    """

    def __init__(self, s_shape: Shape, t_shape: Shape, use_relu: bool = True) -> None:
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg cannot map a student map of size {s_h}x{s_w} to a teacher map of size "
                f"{t_h}x{t_w} (supported: equal, half or double size, or a larger student map)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]."""
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class Connector(nn.Module):
    """AB connectors: per feature pair, identity if channels and height agree, else ConvReg without ReLU."""

    def __init__(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> None:
        super().__init__()
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes
        self.connectors = nn.ModuleList(self._make_conenctors(s_shapes, t_shapes))

    @staticmethod
    def _make_conenctors(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> list[nn.Module]:
        # (sic) RepDistiller's spelling, kept for code that calls it
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"unequal numbers of student ({len(s_shapes)}) and teacher ({len(t_shapes)}) features")
        connectors: list[nn.Module] = []
        for s, t in zip(s_shapes, t_shapes):
            if s[1] == t[1] and s[2] == t[2]:
                connectors.append(nn.Sequential())
            else:
                connectors.append(ConvReg(s, t, use_relu=False))
        return connectors

    def forward(self, g_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s: student maps [B, C_s, H, W] -> maps with the teacher's shapes."""
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


class ConnectorV2(nn.Module):
    """Overhaul connectors: per feature pair, 1x1 conv (C_s -> C_t, no bias) + BN."""

    def __init__(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> None:
        super().__init__()
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes
        self.connectors = self._make_conenctors(s_shapes, t_shapes)

    def _make_conenctors(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> nn.ModuleList:
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"unequal numbers of student ({len(s_shapes)}) and teacher ({len(t_shapes)}) features")
        return nn.ModuleList(
            [self._build_feature_connector(t[1], s[1]) for s, t in zip(s_shapes, t_shapes)]
        )

    @staticmethod
    def _build_feature_connector(t_channel: int, s_channel: int) -> nn.Sequential:
        conv = nn.Conv2d(s_channel, t_channel, kernel_size=1, stride=1, padding=0, bias=False)
        bn = nn.BatchNorm2d(t_channel)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channel))  # fan-out of a 1x1 conv
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return nn.Sequential(conv, bn)

    def forward(self, g_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s: student maps [B, C_s, H, W] -> [B, C_t, H, W]."""
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


class Paraphraser(nn.Module):
    """FT paraphraser: a conv auto-encoder on the teacher map [B, C, H, W]; the factor has int(C k) channels.

    ``encoder``: three 3x3 convs (C -> C -> Ck -> Ck); ``decoder``: three 3x3 transposed convs back to C;
    each followed by an optional BN and LeakyReLU(0.1).
    """

    def __init__(self, t_shape: Shape, k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        in_channel = t_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            _maybe_bn(in_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            _maybe_bn(out_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            _maybe_bn(out_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out_channel, out_channel, 3, 1, 1),
            _maybe_bn(out_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(out_channel, in_channel, 3, 1, 1),
            _maybe_bn(in_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(in_channel, in_channel, 3, 1, 1),
            _maybe_bn(in_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(
        self, f_s: torch.Tensor, is_factor: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """f_s: [B, C, H, W] -> factor [B, Ck, H, W], or ``(factor, reconstruction [B, C, H, W])``."""
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT translator: three 3x3 convs (C_s -> C_s -> int(C_t k) -> int(C_t k)), optional BN, LeakyReLU(0.1)."""

    def __init__(self, s_shape: Shape, t_shape: Shape, k: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        in_channel = s_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            _maybe_bn(in_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            _maybe_bn(out_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            _maybe_bn(out_channel, use_bn),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        """f_s: [B, C_s, H, W] -> factor [B, int(C_t k), H, W]."""
        return self.encoder(f_s)


class Normalize(nn.Module):
    """Divide each row by its L_power norm: [B, D] -> [B, D] (no epsilon, as RepDistiller)."""

    def __init__(self, power: int = 2) -> None:
        super().__init__()
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x.div(norm)


class Flatten(nn.Module):
    """[B, ...] -> [B, prod(...)]."""

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.view(feat.size(0), -1)


class Regress(nn.Module):
    """Linear regression + ReLU for hints on flattened features: [B, ...] -> [B, dim_out]."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 1024) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.linear(x.view(x.shape[0], -1)))


class Embed(nn.Module):
    """The heads g^S and g^T of "Contrastive Representation Distillation" (Tian, Krishnan & Isola,
    ICLR 2020, §3): ``g(x) = normalize(W x + b)``, a linear map followed by L2 normalisation, so
    that the critic's dot products are cosine similarities: [B, ...] (flattening to ``dim_in``) ->
    unit rows [B, dim_out]. Parameters ``linear.weight`` and ``linear.bias``, as in RepDistiller."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


class LinearEmbed(nn.Module):
    """Linear embedding without normalisation (CC's head): [B, ...] -> [B, dim_out]."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.shape[0], -1))


class MLPEmbed(nn.Module):
    """Two-layer MLP embedding (dim_in -> 2 dim_out -> dim_out, ReLU between) + L2 normalisation."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.linear1(x.view(x.shape[0], -1)))
        return self.l2norm(self.linear2(x))


class PoolEmbed(nn.Module):
    """Pool a WRN-16/40-x1 feature map to a fixed grid, flatten, linear, L2-normalise: [B, C, H, W] -> [B, dim_out].

    ``layer`` selects RepDistiller's preset (channels, grid): 0/1 -> (16, 8), 2 -> (32, 6),
    3 -> (64, 4), 4 -> (64, 1) with no pooling (the input is already a vector).
    """

    _PRESETS: dict[int, tuple[int, int]] = {0: (16, 8), 1: (16, 8), 2: (32, 6), 3: (64, 4), 4: (64, 1)}

    def __init__(self, layer: int = 0, dim_out: int = 128, pool_type: str = "avg") -> None:
        super().__init__()
        if layer not in self._PRESETS:
            raise ValueError(f"PoolEmbed: layer must be one of {sorted(self._PRESETS)}, got {layer}")
        if pool_type not in ("avg", "max"):
            raise ValueError(f"PoolEmbed: pool_type must be 'avg' or 'max', got {pool_type!r}")
        channels, pool_size = self._PRESETS[layer]
        self.embed = nn.Sequential()
        if layer <= 3:
            if pool_type == "max":
                self.embed.add_module("MaxPool", nn.AdaptiveMaxPool2d((pool_size, pool_size)))
            else:
                self.embed.add_module("AvgPool", nn.AdaptiveAvgPool2d((pool_size, pool_size)))
        self.embed.add_module("Flatten", Flatten())
        self.embed.add_module("Linear", nn.Linear(channels * pool_size * pool_size, dim_out))
        self.embed.add_module("Normalize", Normalize(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)
