"""Inspecting motion-corpus shards: counts, durations, motion scores and a full decode check.

``data_tools/inspect_shards.py`` prints `report_lines` of `inspect_shards`. With decoding
on, every sample's video is decoded to the end and must reach the frame count its
container header and its metadata promise (the span the loader may read); unreadable
shards, samples without .mp4/.json, undecodable videos and clips too short for a
recipe's frames at its fps are listed by shard and key.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .streaming import expand_shards, iter_shard
from .video import VideoDecodeError, probe_video, verify_video


def inspect_shard(url: str, decode: bool = True, fps: float = 0.0, num_frames: int = 0) -> dict:
    """Per-shard facts: samples, durations, motion scores, problems [(key, what)]."""
    out = {
        "url": url,
        "samples": 0,
        "bytes": 0,
        "durations": [],
        "motion": [],
        "problems": [],
        "too_short": 0,
        "methods": Counter(),
    }
    try:
        for s in iter_shard(url):
            key = s["__key__"]
            out["samples"] += 1
            if "mp4" not in s or "json" not in s:
                out["problems"].append(
                    [key, f"missing member(s): has {sorted(k for k in s if not k.startswith('__'))}"]
                )
                continue
            out["bytes"] += len(s["mp4"])
            try:
                meta = json.loads(s["json"])
                if not isinstance(meta, dict):
                    raise ValueError("json is not an object")
                info = verify_video(s["mp4"]) if decode else probe_video(s["mp4"])
                claimed = meta.get("num_frames")
                if decode and isinstance(claimed, int) and claimed > info.num_frames:
                    raise VideoDecodeError(f"json says {claimed} frames, the video decodes {info.num_frames}")
            except (ValueError, OSError) as exc:  # VideoDecodeError is a ValueError, like bad json
                out["problems"].append([key, f"{type(exc).__name__}: {exc}"])
                continue
            out["durations"].append(info.duration)
            if isinstance(meta.get("motion"), (int, float)):
                out["motion"].append(float(meta["motion"]))
                out["methods"][meta.get("motion_method", "?")] += 1
            if fps > 0 and num_frames > 0 and info.frames_at(fps) < num_frames:
                out["too_short"] += 1
                out["problems"].append([key, f"too short: {info.frames_at(fps)} frames at {fps} fps < {num_frames}"])
    except Exception as exc:  # an unreadable or truncated shard is a finding, not a crash
        out["problems"].append(["<shard>", f"unreadable: {type(exc).__name__}: {exc}"])
    out["methods"] = dict(out["methods"])
    return out


def _inspect(args):
    return inspect_shard(*args)


def inspect_shards(
    spec: str | list[str], decode: bool = True, fps: float = 0.0, num_frames: int = 0, workers: int = 1, bins: int = 10
) -> dict:
    """The corpus report over all shards of `spec` (shards in `workers` spawned processes).

    Plain JSON types; the motion histogram has `bins` bins.
    """
    urls = expand_shards(spec)
    jobs = [(u, decode, fps, num_frames) for u in urls]
    if workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(workers, len(urls)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_inspect, jobs))
    else:
        results = [_inspect(j) for j in jobs]
    durations = [d for r in results for d in r["durations"]]
    motion = [m for r in results for m in r["motion"]]
    methods = Counter()
    for r in results:
        methods.update(r["methods"])
    return {
        "shards": len(urls),
        "samples": sum(r["samples"] for r in results),
        "good": len(durations),
        "bytes": sum(r["bytes"] for r in results),
        "hours": round(sum(durations) / 3600, 4),
        "duration_s": {
            "mean": float(np.mean(durations)),
            "min": float(np.min(durations)),
            "max": float(np.max(durations)),
        }
        if durations
        else {},
        "motion": {
            "mean": float(np.mean(motion)),
            "median": float(np.median(motion)),
            "min": float(np.min(motion)),
            "max": float(np.max(motion)),
            "methods": dict(methods),
        }
        if motion
        else {},
        "motion_histogram": _histogram(motion, bins),
        "too_short": sum(r["too_short"] for r in results),
        "problems": [[r["url"], k, what] for r in results for k, what in r["problems"]],
        "per_shard": {r["url"]: r["samples"] for r in results},
        "decoded": decode,
    }


def _histogram(values: list[float], bins: int) -> dict:
    if not values:
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def histogram_lines(hist: dict, width: int = 40) -> list[str]:
    """A text bar chart of a `_histogram`."""
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return ["  (no motion scores)"]
    top = max(1, max(counts))
    return [
        f"  {edges[i]:8.3f} - {edges[i + 1]:8.3f} | {'#' * int(round(width * c / top)):<{width}} {c}"
        for i, c in enumerate(counts)
    ]


def report_lines(report: dict, max_problems: int = 50) -> list[str]:
    """The human-readable report: totals, durations, motion histogram, problems, verdict."""
    lines = [
        f"{report['shards']} shards, {report['samples']} samples ({report['good']} good), {report['bytes'] / 2**20:.1f} MB, {report['hours']} h of video"
    ]
    if report["duration_s"]:
        d = report["duration_s"]
        lines.append(f"duration per clip: mean {d['mean']:.2f} s, min {d['min']:.2f} s, max {d['max']:.2f} s")
    methods = report["motion"].get("methods", {}) if report["motion"] else {}
    lines.append(f"motion scores ({', '.join(f'{k}: {v}' for k, v in methods.items()) or 'none'}):")
    lines += histogram_lines(report["motion_histogram"])
    problems = report["problems"]
    lines += [f"PROBLEM {url} {key}: {what}" for url, key, what in problems[:max_problems]]
    if len(problems) > max_problems:
        lines.append(f"... and {len(problems) - max_problems} more problems")
    if problems:
        lines.append(f"{len(problems)} problem(s)")
    else:
        lines.append("OK: every sample decodes" if report["decoded"] else "OK (decode check skipped)")
    return lines
