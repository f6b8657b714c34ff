"""Build webdataset motion-corpus shards from a folder or manifest of videos.

    python data_tools/build_shards.py --input videos/ --out shards/ --fps 16 \
        --min-frames 49 --min-motion 2.0 --samples-per-shard 200 --workers 8
    python data_tools/build_shards.py --input manifest.jsonl --out shards/ \
        --raft raft_large.pth --min-motion 3.0

Input: a folder (searched recursively for video files; a caption is read from a
same-named .txt file next to a video when present), a CSV with a ``path`` column and an
optional ``caption`` column, or a JSONL file of ``{"path": ..., "caption": ...}``.
Relative paths in a manifest are relative to the manifest; http(s) URLs work too.

Output: ``NNNNNN.tar`` shards, each sample ``KKKKKK.mp4`` + ``KKKKKK.json`` (source, fps,
num_frames, width, height, duration, caption, motion, motion_method) with KKKKKK the
input's global index; ``summary.json`` with kept / filtered / failed counts.

Filters, both at the target ``--fps`` (the recipe's video.fps): a clip must have at
least ``--min-frames`` frames there, and a motion score of at least ``--min-motion``.
The score is the mean motion in pixels per frame at a 256-pixel short side over the
first ``--score-frames`` frames: RAFT flow magnitude with ``--raft`` weights, else a
cheap normal-flow frame-difference estimate (static clips score ~0; on the synthetic
corpus it reads 1.6x the true speed of a 160-pixel clip, as it should).

Each shard is one job over a fixed run of ``--samples-per-shard`` inputs, run in
``--workers`` processes; a re-run skips shards that are finished (``.build/`` holds
their stats) and refuses to mix runs with different options.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from mogan_ds.data.shards import build_shard, build_stats_path, shard_done

VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif")


def read_inputs(spec: str) -> list[tuple[str, str]]:
    """[(path_or_url, caption)] from a folder, CSV or JSONL manifest, in a stable order."""
    if os.path.isdir(spec):
        items = []
        for root, _, files in os.walk(spec):
            for f in files:
                if f.lower().endswith(VIDEO_EXTS):
                    p = os.path.join(root, f)
                    txt = os.path.splitext(p)[0] + ".txt"
                    caption = open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else ""
                    items.append((p, caption))
        return sorted(items)
    if not os.path.isfile(spec):
        raise SystemExit(f"--input {spec}: no such folder or manifest file")
    base = os.path.dirname(os.path.abspath(spec))

    def resolve(p: str) -> str:
        return p if "://" in p or os.path.isabs(p) else os.path.join(base, p)

    items = []
    with open(spec, encoding="utf-8", newline="") as fh:
        if spec.lower().endswith(".jsonl"):
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if "path" not in row:
                        raise SystemExit(f"{spec}:{n}: no 'path' field")
                    items.append((resolve(row["path"]), str(row.get("caption") or "")))
        elif spec.lower().endswith(".csv"):
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise SystemExit(f"{spec}: CSV needs a 'path' column (and optionally 'caption')")
            items = [(resolve(r["path"]), r.get("caption") or "") for r in reader]
        else:
            raise SystemExit(f"--input {spec}: manifest must be .csv or .jsonl")
    return items


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder of videos, or .csv/.jsonl manifest (path, caption)")
    ap.add_argument("--out", required=True, help="output folder for NNNNNN.tar shards")
    ap.add_argument("--fps", type=float, default=16.0, help="target fps (the recipe's video.fps) for the length and motion checks")
    ap.add_argument("--min-frames", type=int, default=49, help="minimum clip length in frames at --fps (the recipe's video.num_frames)")
    ap.add_argument("--min-motion", type=float, default=0.0, help="minimum motion score (px/frame at a 256-px short side); 0 keeps all")
    ap.add_argument("--score-frames", type=int, default=64, help="frames at --fps the motion score looks at")
    ap.add_argument("--raft", default="", help="torchvision RAFT state dict: score with RAFT instead of frame differences")
    ap.add_argument("--raft-arch", default="raft_large", choices=["raft_large", "raft_small"])
    ap.add_argument("--raft-iters", type=int, default=12, help="RAFT refinement iterations")
    ap.add_argument("--device", default="cpu", help="device for RAFT scoring")
    ap.add_argument("--transcode", action="store_true", help="re-encode every clip at --fps (non-mp4 inputs always are)")
    ap.add_argument("--short-side", type=int, default=0, help="with transcoding: scale to this short side (0 keeps the size)")
    ap.add_argument("--max-frames", type=int, default=0, help="with transcoding: keep at most this many frames (0: all)")
    ap.add_argument("--crf", type=int, default=18, help="x264 quality when transcoding")
    ap.add_argument("--preset", default="medium", help="x264 preset when transcoding")
    ap.add_argument("--samples-per-shard", type=int, default=200, help="inputs per shard (kept clips <= this)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel worker processes (1: in-process)")
    ap.add_argument("--overwrite", action="store_true", help="discard a previous build with other options")
    args = ap.parse_args(argv)
    if args.samples_per_shard < 1 or args.min_frames < 2:
        ap.error("--samples-per-shard must be >= 1 and --min-frames >= 2")

    items = read_inputs(args.input)
    if not items:
        raise SystemExit(f"no videos found in {args.input}")
    opts = {
        k: getattr(args, k)
        for k in ("fps", "min_frames", "min_motion", "score_frames", "raft", "raft_arch", "raft_iters", "device", "transcode", "short_side", "max_frames", "crf", "preset")
    }
    opts["torch_threads"] = max(1, (os.cpu_count() or 1) // max(1, args.workers)) if args.raft else 0
    os.makedirs(os.path.join(args.out, ".build"), exist_ok=True)
    # The build's identity: options + inputs. A re-run with another identity would mix
    # shards filtered differently, so it is refused unless --overwrite.
    ident = {"opts": {k: v for k, v in opts.items() if k not in ("device", "torch_threads")}, "samples_per_shard": args.samples_per_shard,
             "inputs": hashlib.sha256("\n".join(p for p, _ in items).encode()).hexdigest(), "num_inputs": len(items)}
    ident_path = os.path.join(args.out, ".build", "config.json")
    if os.path.exists(ident_path):
        with open(ident_path) as fh:
            previous = json.load(fh)
        if previous != ident:
            if not args.overwrite:
                raise SystemExit(f"{args.out} holds a build with other options or inputs ({ident_path}); use another --out or --overwrite")
            for f in os.listdir(args.out):
                if f.endswith(".tar"):
                    os.remove(os.path.join(args.out, f))
            for f in os.listdir(os.path.join(args.out, ".build")):
                os.remove(os.path.join(args.out, ".build", f))
    with open(ident_path, "w") as fh:
        json.dump(ident, fh, indent=1)

    per = args.samples_per_shard
    jobs = [
        {"index": s, "out": args.out, "opts": opts, "items": [[i, items[i][0], items[i][1]] for i in range(s * per, min(len(items), (s + 1) * per))]}
        for s in range((len(items) + per - 1) // per)
    ]
    todo = [j for j in jobs if not shard_done(args.out, j["index"])]
    print(f"{len(items)} inputs -> {len(jobs)} shards ({len(jobs) - len(todo)} already finished, {len(todo)} to build, {args.workers} workers)", flush=True)
    t0 = time.time()
    if args.workers <= 1 or len(todo) <= 1:
        for j in todo:
            _report(build_shard(j), len(jobs))
    else:
        # spawn: workers must not inherit a parent's torch/OpenMP thread state (fork-unsafe)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.workers, len(todo)), mp_context=ctx) as pool:
            for fut in as_completed([pool.submit(build_shard, j) for j in todo]):
                _report(fut.result(), len(jobs))

    results = []
    for j in jobs:
        with open(build_stats_path(args.out, j["index"])) as fh:
            results.append(json.load(fh))
    summary = {k: sum(r[k] for r in results) for k in ("items", "kept", "filtered_short", "filtered_motion", "failed", "bytes")}
    shards = [r["tar"] for r in results if r["tar"]]
    summary.update(
        shards=len(shards),
        mean_shard_mb=round(summary["bytes"] / max(1, len(shards)) / 2**20, 3),
        built_now=len(todo),
        seconds=round(time.time() - t0, 2),
        failures=[f for r in results for f in r["failures"]][:100],
        options=ident,
    )
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(
        f"kept {summary['kept']} / filtered short {summary['filtered_short']} / filtered motion {summary['filtered_motion']} / "
        f"failed {summary['failed']} of {summary['items']} inputs; {len(shards)} shards, {summary['mean_shard_mb']} MB each on average"
    )
    for path, reason in summary["failures"][:10]:
        print(f"  failed: {path}: {reason}")
    return summary


def _report(result: dict, total: int) -> None:
    print(f"shard {result['index']:06d}/{total}: kept {result['kept']} of {result['items']} ({result['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
