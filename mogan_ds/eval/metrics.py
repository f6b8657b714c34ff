"""The per-video metric bundle: each metric whose weights are given, the others n/a with a reason.

`VideoMetrics.from_weights` loads what `EvalWeights` names; a missing file or optional
package makes that column None (printed "n/a (weights not given)") and records one line
saying why, instead of failing the evaluation. `summarize` turns per-video records into
one row per model, with the paper's motion score (mean of smoothness and dynamics degree).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .dynamic_degree import DynamicDegree, dynamic_degree, raft_flow_fn
from .motion_smoothness import MotionSmoothness, amt_interpolator
from .weights import NOT_GIVEN, MetricUnavailableError, describe_weights, require_path

COLUMNS = ("motion_smoothness", "dynamics_degree", "motion_score", "aesthetic_quality", "imaging_quality")


@dataclass
class EvalWeights:
    """Local weight paths of the evaluation networks (None = not given)."""

    raft: str | None = None  # raft-things.pth (VBench's) or a torchvision raft_large state dict
    amt: str | None = None  # amt-s.pth
    clip: str | None = None  # transformers CLIPModel folder (openai/clip-vit-large-patch14)
    aesthetic: str | None = None  # sa_0_4_vit_l_14_linear.pth
    musiq: str | None = None  # musiq_spaq_ckpt-358bb6af.pth


@dataclass
class VideoMetrics:
    dynamic: DynamicDegree | None = None
    smoothness: MotionSmoothness | None = None
    aesthetic: object | None = None  # AestheticQuality
    imaging: object | None = None  # ImagingQuality
    # column -> "file (sha256 prefix)" labels, or the reason it is n/a
    weights: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, w: EvalWeights, device="cpu", log: Callable[[str], None] = print) -> VideoMetrics:
        m = cls()

        def attempt(column: str, build: Callable[[], tuple[object, list]]):
            try:
                obj, paths = build()
            except MetricUnavailableError as e:
                m.missing[column] = str(e)
                m.weights[column] = NOT_GIVEN
                log(f"[eval] {e}")
                return None
            m.weights[column] = " + ".join(describe_weights(p).label for p in paths)
            return obj

        def raft():
            from .raft_keys import load_raft_checkpoint

            p = require_path(w.raft, "dynamics degree (RAFT)", "--raft")
            model = load_raft_checkpoint(p).to(device)
            return DynamicDegree(raft_flow_fn(model), device), [p]

        def amt():
            from .amt import load_amt_s

            p = require_path(w.amt, "motion smoothness (AMT-S)", "--amt")
            return MotionSmoothness(amt_interpolator(load_amt_s(p).to(device)), device), [p]

        def aesthetic():
            from .quality import AestheticQuality

            c = require_path(w.clip, "aesthetic quality (CLIP ViT-L/14 folder)", "--clip")
            a = require_path(w.aesthetic, "aesthetic quality (LAION predictor)", "--aesthetic")
            return AestheticQuality(c, a, device), [c, a]

        def imaging():
            from .quality import ImagingQuality

            p = require_path(w.musiq, "imaging quality (MUSIQ)", "--musiq")
            return ImagingQuality(p, device), [p]

        m.dynamic = attempt("dynamics_degree", raft)
        m.smoothness = attempt("motion_smoothness", amt)
        m.aesthetic = attempt("aesthetic_quality", aesthetic)
        m.imaging = attempt("imaging_quality", imaging)
        both = [m.weights[c] for c in ("motion_smoothness", "dynamics_degree")]
        m.weights["motion_score"] = NOT_GIVEN if NOT_GIVEN in both else " + ".join(both)
        return m

    def video(self, frames: np.ndarray, fps: float) -> dict:
        """Every available metric of one video (uint8 RGB [T, H, W, 3] at `fps`); None where n/a."""
        rec: dict = {"motion_smoothness": None, "dynamic": None, "aesthetic_quality": None, "imaging_quality": None}
        if self.smoothness is not None:
            rec["motion_smoothness"] = self.smoothness.video(frames)
        if self.dynamic is not None:
            res = self.dynamic.video(frames, fps)
            rec["dynamic"] = res.dynamic
            rec["dynamic_detail"] = res.to_json()
        if self.aesthetic is not None:
            rec["aesthetic_quality"] = self.aesthetic.video(frames)
        if self.imaging is not None:
            rec["imaging_quality"] = self.imaging.video(frames)
        return rec


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def motion_score(smoothness: float | None, dynamics: float | None) -> float | None:
    """The paper's motion score (after VideoJAM): the mean of motion smoothness and dynamics degree."""
    if smoothness is None or dynamics is None:
        return None
    return (smoothness + dynamics) / 2.0


def summarize(model: str, records: Iterable[dict], weights: dict[str, str]) -> dict:
    """One results row from a model's per-video records."""
    records = list(records)
    flags = [r["dynamic"] for r in records if r.get("dynamic") is not None]
    dyn = dynamic_degree(flags) if flags else None
    if dyn is not None and math.isnan(dyn):
        dyn = None
    smooth = _mean([r.get("motion_smoothness") for r in records])
    return {
        "model": model,
        "num_videos": len(records),
        "motion_smoothness": smooth,
        "dynamics_degree": dyn,
        "motion_score": motion_score(smooth, dyn),
        "aesthetic_quality": _mean([r.get("aesthetic_quality") for r in records]),
        "imaging_quality": _mean([r.get("imaging_quality") for r in records]),
        "weights": {c: weights.get(c, NOT_GIVEN) for c in COLUMNS},
    }
