"""Sigmoid-gated skip blend with Minkowski pooling sums (plain-torch reference for now)."""

from __future__ import annotations

import torch


def gated_blend_reference(logit: torch.Tensor, skip: torch.Tensor, dec: torch.Tensor):
    """gamma = sigmoid(logit); out = gamma*skip + (1-gamma)*dec. Returns (out, gamma)."""
    gamma = torch.sigmoid(logit)
    return dec + gamma * (skip - dec), gamma
