"""Deterministic stand-ins for the evaluation networks, for testing VBench's rules on clips of known motion.

`phase_correlation_flow` recovers a clip's global (circular) translation exactly, so a
clip made with np.roll has a known flow; `average_interpolator` is exact for a linear
cross-fade. Random-weight RAFT / AMT-S cannot give either, so the rules and the networks
are tested separately.
"""

import numpy as np
import torch


def phase_correlation_flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[P, 3, H, W] pairs -> constant flow [P, 2, H, W] of the integer translation taking a to b."""
    out = []
    for x, y in zip(a, b):
        ga, gb = x.mean(0).double().numpy(), y.mean(0).double().numpy()
        r = np.fft.fft2(gb) * np.conj(np.fft.fft2(ga))
        corr = np.fft.ifft2(r / np.maximum(np.abs(r), 1e-12)).real
        dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
        h, w = corr.shape
        dy = dy - h if dy > h // 2 else dy
        dx = dx - w if dx > w // 2 else dx
        flow = torch.empty(2, h, w)
        flow[0], flow[1] = float(dx), float(dy)
        out.append(flow)
    return torch.stack(out)


def average_interpolator(f0: torch.Tensor, f1: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * f0 + t * f1


def textured_clip(num_frames: int, size: int, step: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: a smooth random texture translated by `step` pixels per frame (circularly)."""
    rng = np.random.default_rng(seed)
    base = rng.random((size // 4, size // 4, 3))
    base = np.kron(base, np.ones((4, 4, 1)))  # blocky texture: a clear correlation peak
    frames = [np.roll(base, shift=(0, i * step), axis=(0, 1)) for i in range(num_frames)]
    return (np.stack(frames) * 255).round().astype(np.uint8)
