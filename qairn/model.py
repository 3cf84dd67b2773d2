"""QAIRN: a residual U-Net whose skip connections are gated by residual quality attention.

Read top to bottom: config, building blocks, the network, Minkowski pooling. The design is pinned
in ../shared/DESIGN.md section 1 (Gedik, Venkataramanan, Bovik: "Joint Deep Image Restoration and
Unsupervised Quality Assessment"); the trunk follows FBCNN without its QF predictor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qairn.kernels.gate import gated_blend_reference, minkowski_from_sums, scale_cores, scaled_pow


@dataclass(frozen=True)
class QAIRNConfig:
    """The architecture: saved in every weights file's metadata, from which load_model rebuilds it.
    Build one with preset(name, **overrides); the bare defaults (widths 32..256, no residual) match no
    preset."""

    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    nb: int = 2  # residual blocks per U-Net level
    rqa_div: int = 4  # RQAttention hidden width = max(rqa_min, C // rqa_div)
    rqa_min: int = 16
    # Global input residual (out = x + tail). Not in FBCNN/the paper; it makes a short CPU training
    # start at the JPEG floor instead of at zero, so the small preset uses it.
    residual: bool = False
    # Paper form (no global residual) started at the identity: head and tail pass RGB through three
    # channels and the full-scale gate starts open (gamma1 ~ 0.95), so out ~ input at step 0 and
    # training lowers gamma where restoration is needed - the reading of gamma as quality is kept.
    identity_init: bool = False
    p: float = 2.0  # Minkowski exponent for Q = mean(gamma**p)**(1/p)
    preset: str = "custom"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QAIRNConfig:
        d = json.loads(text)
        d["widths"] = tuple(d["widths"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {', '.join(sorted(unknown))}")
        return cls(**d)


PRESETS: dict[str, QAIRNConfig] = {
    "paper": QAIRNConfig(widths=(64, 128, 256, 512), nb=4, residual=False, preset="paper"),
    "small": QAIRNConfig(widths=(16, 32, 64, 128), nb=2, residual=True, preset="small"),
    "small-gated": QAIRNConfig(widths=(16, 32, 64, 128), nb=2, identity_init=True, preset="small-gated"),
    "tiny": QAIRNConfig(widths=(8, 16, 16, 32), nb=1, residual=True, rqa_min=4, preset="tiny"),
}


def preset(name: str, **overrides) -> QAIRNConfig:
    """The config of a named preset (paper, small, small-gated, tiny) with fields replaced, e.g.
    preset("small", widths=(32, 64, 128, 256), nb=3)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    d = asdict(PRESETS[name]) | overrides
    d["widths"] = tuple(d["widths"])
    return QAIRNConfig(**d)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)


class ResBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(x))), with bias and no normalisation (FBCNN)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = conv3x3(c, c)
        self.conv2 = conv3x3(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class RQAttention(nn.Module):
    """Residual quality attention: a small autoencoder from (skip, decoder) to a 1-channel logit.

    Two strided 3x3 convolutions go down (1/4 of the merge's resolution), two 2x2 transposed
    convolutions come back up with additive (residual) links, a 3x3 conv gives the logit. The gate
    gamma = sigmoid(logit) blends: out = gamma * skip + (1 - gamma) * dec (paper eq. 1).
    """

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.inp = conv3x3(2 * c, hidden)
        self.down1 = conv3x3(hidden, hidden, stride=2)
        self.down2 = conv3x3(hidden, hidden, stride=2)
        self.up2 = nn.ConvTranspose2d(hidden, hidden, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(hidden, hidden, 2, stride=2)
        self.out = conv3x3(hidden, 1)
        # Start every gate at gamma = 0.5: neither path is preferred before training.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def logit(self, skip: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        e0 = F.relu(self.inp(torch.cat([skip, dec], dim=1)))
        e1 = F.relu(self.down1(e0))
        e2 = F.relu(self.down2(e1))
        d1 = F.relu(self.up2(e2)) + e1
        d0 = F.relu(self.up1(d1)) + e0
        return self.out(d0)


class QAIRN(nn.Module):
    """The network: QAIRN(preset("small")) builds it untrained; qairn.load_model(path) loads weights.
    forward(x) on (N,3,H,W) RGB in [0,1] returns (restored, [gamma1, gamma2, gamma3])."""

    # Three 2x downsamplings in the trunk, and the deepest gate (gamma3, at 1/4 scale)
    # halves twice more inside its autoencoder: inputs are padded to a multiple of 16.
    stride = 16

    def __init__(self, config: QAIRNConfig = PRESETS["small"]):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.widths
        nb = config.nb

        def blocks(c):
            return [ResBlock(c) for _ in range(nb)]

        self.head = conv3x3(3, c0)
        self.down1 = nn.Sequential(*blocks(c0), nn.Conv2d(c0, c1, 2, stride=2))
        self.down2 = nn.Sequential(*blocks(c1), nn.Conv2d(c1, c2, 2, stride=2))
        self.down3 = nn.Sequential(*blocks(c2), nn.Conv2d(c2, c3, 2, stride=2))
        self.body = nn.Sequential(*blocks(c3), *blocks(c3))
        self.up3 = nn.Sequential(nn.ConvTranspose2d(c3, c2, 2, stride=2), *blocks(c2))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c2, c1, 2, stride=2), *blocks(c1))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(c1, c0, 2, stride=2), *blocks(c0))
        self.tail = conv3x3(c0, 3)
        if config.residual:
            # Start as the identity (out = input): training begins at the JPEG floor.
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

        def hidden(c):
            return max(config.rqa_min, c // config.rqa_div)

        self.rqa3 = RQAttention(c2, hidden(c2))  # 1/4 scale -> gamma3
        self.rqa2 = RQAttention(c1, hidden(c1))  # 1/2 scale -> gamma2
        self.rqa1 = RQAttention(c0, hidden(c0))  # full scale -> gamma1
        if config.identity_init:
            self._init_identity()
        # The gated blend; the Triton backend swaps in its fused op (same signature).
        self.gate = gated_blend_reference

    @torch.no_grad()
    def _init_identity(self) -> None:
        # head: RGB into channels 0..2 unchanged; tail: channels 0..2 back out, nothing else. With the
        # global residual the tail stays zero: the input is added back already (twice would double it).
        self.head.weight[:3].zero_()
        self.head.bias[:3].zero_()
        self.tail.weight.zero_()
        self.tail.bias.zero_()
        for c in range(3):
            self.head.weight[c, c, 1, 1] = 1.0
            if not self.config.residual:
                self.tail.weight[c, c, 1, 1] = 1.0
        self.rqa1.out.bias.fill_(3.0)  # sigmoid(3) = 0.95: the input passes through the skip

    def merge(self, rqa: RQAttention, skip: torch.Tensor, dec: torch.Tensor, **pool):
        return self.gate(rqa.logit(skip, dec), skip, dec, **pool)

    def forward(
        self,
        x: torch.Tensor,
        pool_p: float | None = None,
        cores: torch.Tensor | None = None,
        image: bool = True,
    ):
        """x: (N,3,H,W) RGB in [0,1]. Returns (restored, [gamma1, gamma2, gamma3]).

        gamma1 is full resolution, gamma2 half, gamma3 quarter (of the padded input, cropped back).
        Off by default: with pool_p, also returns [(sum1, count1), (sum2, count2), (sum3, count3)],
        per image the sum of gamma**pool_p over its core box (scaled by 2**96 against fp32 underflow:
        kernels.gate.minkowski_from_sums pools it) and the box's pixel count, taken by the gate
        itself (one fused pass with the Triton backend). cores: (N,4) int (y0, y1, x0, x1) in
        input pixels, default the whole image; each scale rounds it up (kernels.gate.scale_cores).
        image=False: quality only; restored is None, the tail after the last gate is not run.
        """
        h, w = x.shape[-2:]

        def pool(scale):  # the gate's pooling arguments at 1/scale resolution (none by default)
            if pool_p is None:
                return {}
            return {"p": pool_p, "cores": scale_cores(cores, len(x), h, w, scale, x.device)}

        ph, pw = -h % self.stride, -w % self.stride
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

        x1 = self.head(xp)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        y = self.body(x4)
        y = self.up3(y + x4)  # 1/8 merge: addition, as FBCNN
        y, g3, *q3 = self.merge(self.rqa3, x3, y, **pool(4))
        y = self.up2(y)
        y, g2, *q2 = self.merge(self.rqa2, x2, y, **pool(2))
        y = self.up1(y)
        y, g1, *q1 = self.merge(self.rqa1, x1, y, **pool(1))
        gammas = [g1[..., :h, :w], g2[..., : -(-h // 2), : -(-w // 2)], g3[..., : -(-h // 4), : -(-w // 4)]]
        if image:
            y = self.tail(y)
            if self.config.residual:
                y = y + xp
            y = y[..., :h, :w]
        else:
            y = None
        if pool_p is not None:
            return y, gammas, [tuple(q1), tuple(q2), tuple(q3)]
        return y, gammas


def minkowski(gamma: torch.Tensor, p: float) -> torch.Tensor:
    """Per-image Minkowski mean (mean(gamma**p))**(1/p) over all but the batch dimension."""
    # Through the gate's scaled powers: a plain fp32 gamma**p is 0 below gamma 0.2 at p = 64.
    g = gamma.float().flatten(1)
    return minkowski_from_sums(scaled_pow(g, p).mean(dim=1), 1, p)
