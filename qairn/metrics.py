"""Image quality metrics: PSNR, SSIM (torch, differentiable) and PSNR-B, per DESIGN.md section 3."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype)


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """SSIM of (N,C,H,W) tensors: Gaussian 11x11, sigma 1.5, K=(0.01, 0.03), valid region.

    Computed per channel and averaged over channels (and pixels). reduce=False gives one value per
    image. Differentiable: the training loss is L1 + (1 - SSIM).
    """
    c = x.shape[1]
    w = gaussian_window(dtype=x.dtype).to(x.device).expand(c, 1, 11, 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean() if reduce else s.flatten(1).mean(1)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 HxWx3 (or HxW) images, L=255, per channel then averaged (float64)."""
    ta = torch.from_numpy(np.ascontiguousarray(a)).double()
    tb = torch.from_numpy(np.ascontiguousarray(b)).double()
    if ta.ndim == 2:
        ta, tb = ta[..., None], tb[..., None]
    ta, tb = ta.permute(2, 0, 1)[None], tb.permute(2, 0, 1)[None]
    return float(ssim_torch(ta, tb, data_range=255.0))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 images over all channels (inf when identical)."""
    m = mse(a, b)
    return math.inf if m == 0 else 10 * math.log10(255.0**2 / m)


def rgb_to_y_studio(rgb: np.ndarray) -> np.ndarray:
    """BT.601 'studio' luma: round(16 + (65.481 R + 128.553 G + 24.966 B) / 255), float64."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0)


def blocking_effect_factor(y: np.ndarray, block: int = 8) -> float:
    """BEF of Yim & Bovik (2011) on a single-channel float image (block boundaries of size `block`)."""
    y = y.astype(np.float64)
    h, w = y.shape
    # Horizontal neighbours (differences between columns j and j+1).
    dh = (y[:, :-1] - y[:, 1:]) ** 2
    dv = (y[:-1, :] - y[1:, :]) ** 2
    h_bound = np.zeros(w - 1, dtype=bool)
    h_bound[block - 1 :: block] = True
    v_bound = np.zeros(h - 1, dtype=bool)
    v_bound[block - 1 :: block] = True
    n_hb = h * h_bound.sum()
    n_hbc = h * (w - 1) - n_hb
    n_vb = w * v_bound.sum()
    n_vbc = w * (h - 1) - n_vb
    d_b = (dh[:, h_bound].sum() + dv[v_bound, :].sum()) / max(n_hb + n_vb, 1)
    d_bc = (dh[:, ~h_bound].sum() + dv[~v_bound, :].sum()) / max(n_hbc + n_vbc, 1)
    eta = math.log2(block) / math.log2(min(h, w)) if d_b > d_bc else 0.0
    return eta * (d_b - d_bc)


def psnr_b(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR-B: 10 log10(255^2 / (MSE_rgb + BEF(Y of the tested image)))."""
    m = mse(ref, test)
    y = rgb_to_y_studio(test) if test.ndim == 3 else test.astype(np.float64)
    denom = m + blocking_effect_factor(y)
    return math.inf if denom == 0 else 10 * math.log10(255.0**2 / denom)
