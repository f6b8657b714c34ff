"""The toy world's measuring instruments: clip <-> tensor conversion, the trained toy RAFT,
its flow and the VBench-rule metrics built on it, and the results table's statistics.

Kept apart from `stages/` so the plots can use the same flow without importing the
experiment driver.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mogan_ds.data.synthetic import exact_flow


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.movedim(-1, -3)


def true_flow(meta: dict, t: int) -> torch.Tensor:
    return torch.from_numpy(exact_flow(meta, t, meta["height"], meta["width"]))


def load_toy_raft(path: Path, device="cpu") -> torch.nn.Module:
    """The frozen toy RAFT on `device`, always fp32: its correlation volume and iterative
    refinement are what every flow figure rests on, so it gets no autocast anywhere."""
    from mogan_ds.models.builders import build_raft

    raft = build_raft("raft_small")
    raft.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return raft.float().eval().requires_grad_(False).to(device)


def module_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def raft_pair_flow(raft, a: torch.Tensor, b: torch.Tensor, iters: int, chunk: int = 8) -> torch.Tensor:
    """Flow of frames in [-1, 1], [P, 3, H, W] -> [P, 2, H, W] on the CPU, in chunks of pairs
    (computed on the RAFT's device, fp32)."""
    dev = module_device(raft)
    return torch.cat(
        [
            raft(a[i : i + chunk].to(dev), b[i : i + chunk].to(dev), num_flow_updates=iters)[-1].float().cpu()
            for i in range(0, len(a), chunk)
        ]
    )


def flow_pairs(clips: list[tuple[np.ndarray, dict]], n: int, seed: int = 0):
    """`n` frame pairs drawn (fixed seed) from clips with ground truth -> frames t, t+1 in [-1, 1]
    [n, 3, H, W] each and their exact flow [n, 2, H, W]."""
    nf = clips[0][0].shape[0]
    pairs = [(c, t) for c in range(len(clips)) for t in range(nf - 1)]
    pick = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))[:n]]
    a = torch.stack([to_unit(clips[c][0][t]) for c, t in pick])
    b = torch.stack([to_unit(clips[c][0][t + 1]) for c, t in pick])
    return a, b, torch.stack([true_flow(clips[c][1], t) for c, t in pick])


def heldout_epe(raft, a: torch.Tensor, b: torch.Tensor, gt: torch.Tensor, iters=(4, 20)) -> dict:
    """End-point error of RAFT's flow against the exact flow, and of the zero-flow baseline
    (whose EPE is |true flow|): over all pixels, and over the moving ones (|flow| > 0.5 px)."""
    out = {"heldout_pairs": len(a), "zero_flow_epe": round(float(gt.norm(dim=1).mean()), 4)}
    moving = gt.norm(dim=1) > 0.5
    for n in iters:
        err = torch.linalg.vector_norm(raft_pair_flow(raft, a, b, n) - gt, dim=1)
        out[f"heldout_epe_iters{n}"] = round(float(err.mean()), 4)
        if moving.any():
            out[f"heldout_epe_moving_pixels_iters{n}"] = round(float(err[moving].mean()), 4)
    out["zero_flow_epe_moving_pixels"] = round(float(gt.norm(dim=1)[moving].mean()), 4) if moving.any() else None
    return out


def clip_flow(raft, video: np.ndarray, iters: int = 20) -> torch.Tensor:
    """RAFT flow of every consecutive pair of a uint8 clip [F, H, W, 3] -> [F-1, 2, H, W]."""
    x = to_unit(video)
    return raft_pair_flow(raft, x[:-1], x[1:], iters)


def static_uniform_flow(raft, size: int, levels=(0, 20, 128), iters: int = 20) -> dict:
    """Mean RAFT flow (px/frame) on static clips of one uniform grey level each, whose true flow
    is zero: a flow instrument that reports motion here inflates the flow of dark or flat
    generated frames (keys "uniform_<level>")."""
    out = {
        f"uniform_{v}": round(
            float(clip_flow(raft, np.full((3, size, size, 3), v, np.uint8), iters).norm(dim=1).mean()), 4
        )
        for v in levels
    }
    # A uniform clip that dims (128 -> 104 over three frames), as generated clips often do.
    dimming = np.stack([np.full((size, size, 3), v, np.uint8) for v in (128, 116, 104)])
    out["uniform_128_dimming"] = round(float(clip_flow(raft, dimming, iters).norm(dim=1).mean()), 4)
    return out


def static_pairs(n: int, size: int, frames: torch.Tensor, gen: torch.Generator, gain: float = 0.15):
    """`n` static frame pairs of flat or smooth scenes, whose true flow is zero, for the flow
    model's training: frames t, t+1 in [-1, 1] [n, 3, size, size] each and zero flow [n, 2, size, size].

    The textured world has no flat frame, so a RAFT trained on it alone reads ~3 px/frame of
    motion on uniform clips (`static_uniform_flow`), and generated frames are often flat or
    dark. Half of the pairs are one uniform colour (a third of those near black), half a real
    frame from `frames` ([M, 3, H, W] in [-1, 1]) blurred to its lowest frequencies (4x4 cells);
    frame t+1 is frame t under a global brightness gain in [1 - gain, 1 + gain]: illumination
    changes, not motion.
    """
    u = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731
    colour = u(n, 3, 1, 1) * 2 - 1
    dark = u(n, 1, 1, 1) < 1 / 3
    colour = torch.where(dark, -1 + 0.25 * (colour + 1) / 2, colour).expand(n, 3, size, size)
    pick = torch.randint(len(frames), (n,), generator=gen)
    smooth = F.interpolate(F.adaptive_avg_pool2d(frames[pick], 4), size=(size, size), mode="bilinear")
    a = torch.where(u(n, 1, 1, 1) < 0.5, colour, smooth)
    g = 1 + gain * (2 * u(n, 1, 1, 1) - 1)
    b = ((a + 1) * g - 1).clamp(-1, 1)  # the gain acts on intensity in [0, 2], not on [-1, 1]
    return a, b, torch.zeros(n, 2, size, size)


def flow_per_pair(flows: list[torch.Tensor]) -> list[float]:
    """Mean flow magnitude of each consecutive frame pair (px/frame) from `clip_flow` results of
    clips of equal length: where in the 4-frame latent chunks a VAE's reconstructions keep motion."""
    per = torch.stack([f.norm(dim=1).mean(dim=(1, 2)) for f in flows]).mean(dim=0)
    return [round(float(m), 3) for m in per]


def flow_interpolator(raft, iters: int = 20):
    """A frame interpolator for VBench's motion-smoothness rule made from the toy RAFT.

    AMT-S (VBench's interpolator) has no weights for this world and none can be downloaded,
    so the intermediate frame is the flow-based one of Super SloMo (Jiang et al. 2018, eq. 4):
    F_t0 = -(1-t) t F01 + t^2 F10, F_t1 = (1-t)^2 F01 - t (1-t) F10, both ends warped there
    and blended (1-t, t). Stated next to the numbers as the smoothness column's interpolator.
    """
    from mogan_ds.eval.amt import warp

    def interpolate(f0: torch.Tensor, f1: torch.Tensor, t: float) -> torch.Tensor:
        a, b = f0 * 2 - 1, f1 * 2 - 1
        f01, f10 = raft_pair_flow(raft, a, b, iters), raft_pair_flow(raft, b, a, iters)
        ft0 = -(1 - t) * t * f01 + t * t * f10
        ft1 = (1 - t) * (1 - t) * f01 - t * (1 - t) * f10
        return ((1 - t) * warp(f0, ft0) + t * warp(f1, ft1)).clamp(0, 1)

    return interpolate


# ---------------------------------------------------------------------------------------------
# The captioned object: is the caption's coloured shape drawn, and does it travel as captioned?

#: Speeds (px/frame) a caption's speed word stands for: the middle of its band of the data
#: world's object speeds (stage 1: 3-12 px/frame, "slowly" under 5, "steadily" under 8).
DEFAULT_SPEED_WORDS = (5.0, 8.0)
DEFAULT_SPEED_RANGE = (3.0, 12.0)
#: Texture amplitude the world adds (grey) to every background (synthetic.render_clip: 60).
TEXTURE_AMPLITUDE = 60.0


def caption_target(caption: str, speed_words=DEFAULT_SPEED_WORDS, speed_range=DEFAULT_SPEED_RANGE) -> dict:
    """What a caption asks of its main object: colour (name and RGB), the background's, and the
    motion in the frame: a unit direction (image y down) and a speed in px/frame where the
    caption says them. "moving <dir> <speed>": that direction, the speed word's band middle;
    "..., the camera pans <dir>" without "moving": the object moves with the scene, opposite to
    the pan, at a speed the caption does not give; "static camera": no motion (speed 0)."""
    import re

    from mogan_ds.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS

    words = caption.split()
    colour = words[1] if len(words) > 1 and words[1] in COLORS else None
    bg = re.search(r"on a (\w+)", caption)
    bg = bg.group(1) if bg and bg.group(1) in BACKGROUNDS else None

    def unit(word: str, sign: float = 1.0) -> list[float]:
        a = math.radians(45.0 * DIRECTIONS.index(word))
        return [round(sign * math.cos(a), 6), round(sign * math.sin(a), 6)]

    lo, hi = speed_words
    bands = {"slowly": (speed_range[0], lo), "steadily": (lo, hi), "quickly": (hi, speed_range[1])}
    direction, speed = None, None
    moving = re.search(r"moving ([a-z-]+) (slowly|steadily|quickly)", caption)
    pan = re.search(r"camera pans ([a-z-]+)", caption)
    if moving and moving.group(1) in DIRECTIONS:
        direction, speed = unit(moving.group(1)), sum(bands[moving.group(2)]) / 2
    elif pan and pan.group(1) in DIRECTIONS:
        direction = unit(pan.group(1), -1.0)  # a pan moves the scene, and the object in it, the other way
    elif "static camera" in caption:
        speed = 0.0
    return {
        "colour": colour,
        "rgb": COLORS.get(colour),
        "background": bg,
        "background_rgb": BACKGROUNDS.get(bg),
        "direction": direction,
        "speed": speed,
    }


def _segment(rgb, lo: float, hi: float, n: int = 32) -> np.ndarray:
    return np.asarray(rgb, np.float64)[None] * np.linspace(lo, hi, n)[:, None]


def colour_ambiguous(target: dict, tol: float, shade=(0.5, 1.05)) -> bool:
    """Whether the caption's colour, over the shading the world puts on shapes, comes within
    `tol` of its background's colours under the grey texture (white on a gray background):
    there a colour mask cannot tell the object from the background, and the video is not scored."""
    if target["rgb"] is None:
        return True
    if target["background_rgb"] is None:
        return False
    obj = _segment(target["rgb"], *shade)
    t = np.linspace(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, 32)[:, None]
    bg = np.clip(np.asarray(target["background_rgb"], np.float64)[None] + t, 0, 255)
    return float(np.sqrt(((obj[:, None] - bg[None]) ** 2).sum(-1)).min()) < tol


def colour_blob(frame: np.ndarray, rgb, tol: float = 40.0, min_area: float = 0.01, shade=(0.5, 1.05)):
    """The largest connected region of a uint8 frame [H, W, 3] in the colour `rgb` (any shading
    s * rgb with s in `shade`, the world shades shapes by 0.4-1.0, within `tol` in RGB): its
    centroid (x, y) in pixels, or None when it covers under `min_area` of the frame."""
    from scipy import ndimage

    p = frame.astype(np.float32).reshape(-1, 3)
    c = np.asarray(rgb, np.float32)
    s = np.clip(p @ c / float(c @ c), *shade)
    mask = (np.linalg.norm(p - s[:, None] * c[None], axis=1) < tol).reshape(frame.shape[:2])
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    if sizes[k - 1] < min_area * mask.size:
        return None
    yy, xx = np.nonzero(labels == k)
    return float(xx.mean()), float(yy.mean())


def blob_motion(frames: np.ndarray, caption: str, tol: float = 40.0, min_area: float = 0.01, **target_kw) -> dict:
    """Whether a video draws its caption's object and moves it as captioned.

    Per frame, the largest region in the caption's colour (`colour_blob`); its centroid's
    velocity is the least-squares slope over the frames where it is found (px/frame, image y
    down). Returns:
      blob_scored: False when the caption's colour cannot be told from its background (white on
        gray) or names no colour; the other fields are then None;
      blob_found_fraction: frames where the blob is found;
      blob_velocity: [vx, vy] (None with under 2 frames found);
      blob_along: the velocity's component along the captioned direction (px/frame; None when the
        caption gives no direction or the blob is not tracked);
      blob_direction_match: for captions with a direction, 1.0 when the blob is tracked, moves
        faster than 1 px/frame and within 45 degrees of the captioned direction, else 0.0;
      blob_speed_ratio: blob_along over the caption's speed (its speed word's band middle);
      blob_static_speed: for static captions, the blob's speed (should be ~0).
    """
    target = caption_target(caption, **target_kw)
    out = {
        k: None
        for k in (
            "blob_found_fraction",
            "blob_velocity",
            "blob_along",
            "blob_direction_match",
            "blob_speed_ratio",
            "blob_static_speed",
        )
    }
    out["blob_scored"] = not colour_ambiguous(target, tol)
    if not out["blob_scored"]:
        return out
    cents = [colour_blob(f, target["rgb"], tol, min_area) for f in frames]
    found = [(t, c) for t, c in enumerate(cents) if c is not None]
    out["blob_found_fraction"] = len(found) / len(frames)
    v = None
    if len(found) >= 2:
        t = np.array([t for t, _ in found], np.float64)
        xy = np.array([c for _, c in found], np.float64)
        tc = t - t.mean()
        v = (tc @ (xy - xy.mean(0))) / float(tc @ tc)
        out["blob_velocity"] = [round(float(v[0]), 4), round(float(v[1]), 4)]
    d = target["direction"]
    if d is not None:
        along = None if v is None else float(v @ np.asarray(d))
        out["blob_along"] = along
        speed = 0.0 if v is None else float(np.linalg.norm(v))
        out["blob_direction_match"] = float(v is not None and speed > 1.0 and along > speed * math.cos(math.pi / 4))
        if target["speed"] and along is not None:
            out["blob_speed_ratio"] = along / target["speed"]
    elif target["speed"] == 0.0 and v is not None:
        out["blob_static_speed"] = float(np.linalg.norm(v))
    return out


#: Stage 7's blob columns: (results column, markdown header).
BLOB_COLS = {
    "blob_found_fraction": "Blob found (frames)",
    "blob_direction_match": "Moves as captioned",
    "blob_along": "Along caption (px/frame)",
    "blob_speed_ratio": "Speed / captioned",
    "blob_static_speed": "Static captions: speed (px/frame)",
}


class ToyMetrics:
    """Per-video motion metrics on the frozen toy RAFT, through the evaluator's VBench rules."""

    WEIGHTS = {
        "dynamics_degree": "toy raft_small (stage 2), 20 iterations",
        "motion_smoothness": "toy raft_small flow interpolation (stand-in for AMT-S, stage 7)",
        "aesthetic_quality": "n/a (no CLIP/LAION weights in the toy world)",
        "imaging_quality": "n/a (no MUSIQ weights in the toy world)",
    }

    def __init__(self, raft, fps: float, real_bank: torch.Tensor | None = None, nearest_size: int = 64):
        from mogan_ds.eval.dynamic_degree import DynamicDegree
        from mogan_ds.eval.motion_smoothness import MotionSmoothness

        self.raft, self.fps = raft, fps
        self._flows: list[torch.Tensor] = []

        def recording_flow(img1, img2):
            # DynamicDegree's flow function; the flows are kept for the mean-magnitude column.
            dev = module_device(raft)
            a, b = (2 * (img.to(dev) / 255.0) - 1.0 for img in (img1, img2))
            flow = raft(a, b, num_flow_updates=20)[-1].float().cpu()
            self._flows.append(flow)
            return flow

        self.dynamic = DynamicDegree(recording_flow, pairs_per_batch=8)
        self.smooth = MotionSmoothness(flow_interpolator(raft), pairs_per_batch=4)
        self.real_bank = real_bank
        self.nearest_size = nearest_size
        # caption_target's speed bands: the data recipe's (set by the stages from stage 1's world)
        self.blob_kw: dict = {}
        self.weights = dict(self.WEIGHTS)
        self.weights["motion_score"] = f"{self.weights['motion_smoothness']} + {self.weights['dynamics_degree']}"

    @torch.no_grad()
    def video(self, frames: np.ndarray, caption: str | None = None) -> dict:
        """The video's metrics; with its `caption`, also the captioned object's (`blob_motion`)."""
        self._flows = []
        dyn = self.dynamic.video(frames, self.fps)
        flow = torch.cat(self._flows)
        rec = {
            "dynamic": dyn.dynamic,
            "dynamic_detail": dyn.to_json(),
            "motion_smoothness": self.smooth.video(frames),
            "mean_flow_magnitude": float(torch.linalg.vector_norm(flow, dim=1).mean()),
            "aesthetic_quality": None,
            "imaging_quality": None,
        }
        if self.real_bank is not None:
            rec["psnr_nearest_real"] = nearest_psnr(frames, self.real_bank, self.nearest_size)
        if caption is not None:
            rec.update(blob_motion(frames, caption, **self.blob_kw))
        return rec


def frame_bank(clips: list[np.ndarray], size: int) -> torch.Tensor:
    """Real frames downsampled to size x size, flattened to [M, D] in [0, 1]."""
    x = torch.cat([to_unit(c) for c in clips]) * 0.5 + 0.5
    return F.interpolate(x, size=(size, size), mode="area").flatten(1)


def psnr_db(mse, peak: float):
    """PSNR in dB of a mean squared error on a signal whose peak-to-peak range is `peak`.

    `mse` is a float or a tensor (elementwise); it is floored at 1e-10 so identical signals give a
    large finite figure rather than inf. Peaks in this experiment: 255 (uint8 frames), 2 (VAE
    input in [-1, 1]), 1 (frames in [0, 1]).
    """
    if isinstance(mse, torch.Tensor):
        return 10 * torch.log10(peak**2 / mse.clamp_min(1e-10))
    return 10 * math.log10(peak**2 / max(float(mse), 1e-10))


def nearest_psnr(frames: np.ndarray, bank: torch.Tensor, size: int) -> float:
    """Mean over the video's frames of the PSNR (at size x size) to the nearest real frame: appearance."""
    g = F.interpolate(to_unit(frames) * 0.5 + 0.5, size=(size, size), mode="area").flatten(1)
    # ||g - r||^2 / D for every pair, without materialising the differences.
    mse = (g.pow(2).sum(1, keepdim=True) - 2 * g @ bank.T + bank.pow(2).sum(1)[None]) / g.shape[1]
    return float(psnr_db(mse.min(dim=1).values, peak=1.0).mean())


def bootstrap_ci(values, stat: Callable[[np.ndarray], float], n: int, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of `stat` over the videos (resampled with replacement)."""
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(vals) == 0:
        return None
    rng = np.random.default_rng(seed)
    stats = [stat(vals[rng.integers(0, len(vals), len(vals))]) for _ in range(n)]
    return [round(float(np.percentile(stats, 2.5)), 4), round(float(np.percentile(stats, 97.5)), 4)]


def results_row(name: str, records: list[dict], weights: dict, n_boot: int) -> dict:
    """The evaluator's row (`summarize`) plus the toy's extra columns and their 95% intervals."""
    from mogan_ds.eval.metrics import summarize

    row = summarize(name, records, weights)
    extra = {
        "dynamics_degree": [float(r["dynamic"]) for r in records],
        "motion_smoothness": [r["motion_smoothness"] for r in records],
        "mean_flow_magnitude": [r["mean_flow_magnitude"] for r in records],
        "psnr_nearest_real": [r.get("psnr_nearest_real") for r in records],
        # the captioned object (`blob_motion`); absent from records cached before it was measured
        **{c: [r.get(c) for r in records] for c in BLOB_COLS},
    }
    for col, vals in extra.items():
        present = [v for v in vals if v is not None]
        if col not in row:
            row[col] = float(np.mean(present)) if present else None
        row[f"{col}_ci95"] = bootstrap_ci(present, np.mean, n_boot)
    return row


def paired_difference(records: list[dict], base: list[dict], col: str, n_boot: int) -> dict:
    """`col` of one model minus a baseline's over the same videos (video i of both has the same
    caption and noise): mean, 95% bootstrap interval of the mean, and how many videos are higher."""
    d = [r[col] - b[col] for r, b in zip(records, base, strict=True)]
    return {
        "mean": round(float(np.mean(d)), 4),
        "ci95": bootstrap_ci(d, np.mean, n_boot),
        "higher": int(sum(x > 0 for x in d)),
        "videos": len(d),
    }
