"""Inspect motion-corpus shards: counts, durations, motion histogram, and a full decode check.

    python data_tools/inspect_shards.py shards/                 # a folder
    python data_tools/inspect_shards.py 'shards/{000000..000099}.tar' --workers 8 --json report.json
    python data_tools/inspect_shards.py shards/ --fps 16 --num-frames 49   # usable for a recipe?

Every sample's video is decoded frame by frame (skip with --no-decode); unreadable
shards, samples without .mp4/.json, undecodable videos and clips too short for
--num-frames at --fps are listed by shard and key. Exit status 1 if anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from mogan_ds.data.shards import expand_shards, iter_shard
from mogan_ds.data.video import VideoDecodeError, iter_frames, probe_video


def inspect_shard(url: str, decode: bool = True, fps: float = 0.0, num_frames: int = 0) -> dict:
    """Per-shard facts: samples, durations, motion scores, problems [(key, what)]."""
    out = {"url": url, "samples": 0, "bytes": 0, "durations": [], "motion": [], "problems": [], "too_short": 0, "methods": Counter()}
    try:
        for s in iter_shard(url):
            key = s["__key__"]
            out["samples"] += 1
            if "mp4" not in s or "json" not in s:
                out["problems"].append([key, f"missing member(s): has {sorted(k for k in s if not k.startswith('__'))}"])
                continue
            out["bytes"] += len(s["mp4"])
            try:
                meta = json.loads(s["json"])
                info = probe_video(s["mp4"])
                if decode:
                    n = sum(1 for _ in iter_frames(s["mp4"]))
                    if info.num_frames and abs(n - info.num_frames) > 1:
                        raise VideoDecodeError(f"decoded {n} frames, container says {info.num_frames}")
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


def histogram(values: list[float], bins: int = 10, width: int = 40) -> list[str]:
    if not values:
        return ["  (no motion scores)"]
    counts, edges = np.histogram(values, bins=bins)
    top = max(1, counts.max())
    return [f"  {edges[i]:8.3f} - {edges[i + 1]:8.3f} | {'#' * int(round(width * c / top)):<{width}} {c}" for i, c in enumerate(counts)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="folder, glob, brace pattern or URL list ('::'-separated)")
    ap.add_argument("--no-decode", action="store_true", help="skip the frame-by-frame decode check")
    ap.add_argument("--fps", type=float, default=0.0, help="with --num-frames: flag clips too short for a recipe")
    ap.add_argument("--num-frames", type=int, default=0)
    ap.add_argument("--bins", type=int, default=10, help="motion histogram bins")
    ap.add_argument("--workers", type=int, default=1, help="shards inspected in parallel processes")
    ap.add_argument("--json", default="", help="also write the report as JSON here")
    args = ap.parse_args(argv)

    urls = expand_shards(args.shards)
    jobs = [(u, not args.no_decode, args.fps, args.num_frames) for u in urls]
    if args.workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(args.workers, len(urls)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_inspect, jobs))
    else:
        results = [_inspect(j) for j in jobs]

    durations = [d for r in results for d in r["durations"]]
    motion = [m for r in results for m in r["motion"]]
    problems = [[r["url"], k, what] for r in results for k, what in r["problems"]]
    methods = Counter()
    for r in results:
        methods.update(r["methods"])
    report = {
        "shards": len(urls),
        "samples": sum(r["samples"] for r in results),
        "good": len(durations),
        "bytes": sum(r["bytes"] for r in results),
        "hours": round(sum(durations) / 3600, 4),
        "duration_s": {"mean": float(np.mean(durations)), "min": float(np.min(durations)), "max": float(np.max(durations))} if durations else {},
        "motion": {"mean": float(np.mean(motion)), "median": float(np.median(motion)), "min": float(np.min(motion)), "max": float(np.max(motion)), "methods": dict(methods)} if motion else {},
        "too_short": sum(r["too_short"] for r in results),
        "problems": problems,
        "per_shard": {r["url"]: r["samples"] for r in results},
    }
    print(f"{report['shards']} shards, {report['samples']} samples ({report['good']} good), {report['bytes'] / 2**20:.1f} MB, {report['hours']} h of video")
    if durations:
        d = report["duration_s"]
        print(f"duration per clip: mean {d['mean']:.2f} s, min {d['min']:.2f} s, max {d['max']:.2f} s")
    print(f"motion scores ({', '.join(f'{k}: {v}' for k, v in methods.items()) or 'none'}):")
    print("\n".join(histogram(motion, args.bins)))
    for url, key, what in problems[:50]:
        print(f"PROBLEM {url} {key}: {what}")
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more problems")
    print("OK: every sample decodes" if not problems and not args.no_decode else f"{len(problems)} problem(s)" if problems else "OK (decode check skipped)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
