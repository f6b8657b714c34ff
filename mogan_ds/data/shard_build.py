"""Building motion-corpus shards: tar writing, one-shard build jobs and the resumable build run.

`run_build` is what ``data_tools/build_shards.py`` drives: inputs are cut into fixed runs
of ``samples_per_shard``, one job = one output shard, so a re-run knows from the files
alone which shards are finished, and parallel workers never share a shard. A job
(`build_shard`) probes each input, filters it by length and motion score at the target
fps, checks that what it keeps decodes over the whole span the loader may read, and
writes ``NNNNNN.tar`` with ``KKKKKK.mp4`` + ``KKKKKK.json`` samples.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch
import webdataset as wds

from ..errors import BadFileError
from .motion_score import RaftScorer, analysis_size, motion_score
from .video import ClipTooShortError, encode_mp4, even_size, iter_frames, probe_video, verify_video

VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif")

# Every option a build job reads, with the CLI's defaults (data_tools/build_shards.py --help).
DEFAULT_OPTIONS = {
    "fps": 16.0,  # target fps of the length and motion checks (the recipe's video.fps)
    "min_frames": 49,  # minimum clip length in frames at fps
    "min_motion": 0.0,  # minimum motion score; 0 keeps all
    "score_frames": 64,  # frames at fps the motion score looks at
    "raft": "",  # RAFT state dict: score with RAFT instead of frame differences
    "raft_arch": "raft_large",
    "raft_iters": 12,
    "device": "cpu",
    "transcode": False,  # re-encode every clip at fps (non-mp4 inputs always are)
    "short_side": 0,  # with transcoding: scale to this short side (0 keeps the size)
    "max_frames": 0,  # with transcoding: keep at most this many frames (0: all)
    "codec": "libx264",
    "pix_fmt": "yuv420p",
    "crf": 18,
    "preset": "medium",
    "torch_threads": 0,  # torch threads per worker process (0: leave as is)
}
# Options that do not change what a build writes (may differ between runs of one build).
_RUNTIME_OPTIONS = ("device", "torch_threads")


class ManifestError(BadFileError):
    """An input list (CSV / JSONL manifest) that cannot be read; the message names the file."""


# --------------------------------------------------------------------------- writing


def write_tar_atomic(path: str, samples: list[dict] | Iterable[dict]) -> int:
    """Write samples to `path` via a temporary name and an atomic rename; returns the count.

    A crash leaves no half-written shard under the final name, which is what makes the
    shard builders resumable.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    try:
        with wds.TarWriter(tmp, mtime=0) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


# --------------------------------------------------------------------------- inputs


def read_inputs(spec: str) -> list[tuple[str, str]]:
    """[(path_or_url, caption)] from a folder, CSV or JSONL manifest, in a stable order.

    A folder is searched recursively for video files; a caption is read from a
    same-named .txt file next to a video. A manifest has a ``path`` column/field and an
    optional ``caption``; relative paths are relative to the manifest.
    """
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
        raise FileNotFoundError(f"--input {spec}: no such folder or manifest file")
    base = os.path.dirname(os.path.abspath(spec))

    def resolve(p: str) -> str:
        return p if "://" in p or os.path.isabs(p) else os.path.join(base, p)

    items = []
    with open(spec, encoding="utf-8", newline="") as fh:
        if spec.lower().endswith(".jsonl"):
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise ManifestError(f"{spec}:{n}: not JSON: {exc}") from None
                    if not isinstance(row, dict) or "path" not in row:
                        raise ManifestError(f"{spec}:{n}: no 'path' field")
                    items.append((resolve(row["path"]), str(row.get("caption") or "")))
        elif spec.lower().endswith(".csv"):
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ManifestError(f"{spec}: CSV needs a 'path' column (and optionally 'caption')")
            items = [(resolve(r["path"]), r.get("caption") or "") for r in reader]
        else:
            raise ManifestError(f"--input {spec}: manifest must be .csv or .jsonl")
    return items


# --------------------------------------------------------------------------- one shard


@functools.lru_cache(maxsize=1)
def _raft_scorer(weights: str, arch: str, device: str, iters: int) -> RaftScorer:
    # A worker process builds many shards: load the RAFT weights once per process.
    return RaftScorer(weights, arch, device, iters=iters)


def build_stats_path(out: str, index: int) -> str:
    return os.path.join(out, ".build", f"{index:06d}.json")


def shard_done(out: str, index: int) -> bool:
    """A shard is finished when its stats exist and its tar (if any clip was kept) too."""
    p = build_stats_path(out, index)
    if not os.path.exists(p):
        return False
    with open(p) as fh:
        tar = json.load(fh).get("tar")
    return tar is None or os.path.exists(os.path.join(out, tar))


def _kept_clip(data: bytes, path: str, opts: dict, raft: RaftScorer | None) -> tuple[bytes, dict] | str:
    """(mp4 bytes to store, metadata) of one input, or the filter that drops it
    ("filtered_short" / "filtered_motion"); raises for input that cannot be decoded."""
    fps, min_frames = float(opts["fps"]), int(opts["min_frames"])
    info = probe_video(data)
    if info.frames_at(fps) < min_frames:  # the header already says too short: no decoding
        return "filtered_short"
    score = motion_score(data, fps, max_frames=opts["score_frames"], raft=raft)
    if score < opts["min_motion"]:
        return "filtered_motion"
    meta = {"source": path}
    if opts["transcode"] or "mp4" not in info.format.split(","):
        if opts["short_side"]:
            h, w = analysis_size(info.height, info.width, opts["short_side"])
            frames = iter_frames(data, fps=fps, height=h, width=w, max_frames=opts["max_frames"] or None)
        else:
            # "keeps the size": an odd side loses one row/column (4:2:0 needs even sides), nothing is resampled
            h, w = even_size(info.height, info.width)
            frames = iter_frames(data, fps=fps, height=h, width=w, max_frames=opts["max_frames"] or None, resize=False)
        frames = np.stack(list(frames))  # decodes to the end (or max_frames): damage raises here
        data = encode_mp4(
            frames, fps, codec=opts["codec"], crf=opts["crf"], preset=opts["preset"], pix_fmt=opts["pix_fmt"]
        )
        n = int(frames.shape[0])
        meta.update(fps=fps, num_frames=n, width=w, height=h, duration=round(n / fps, 4))
        n_at_fps = n
    else:
        # The header's frame count is what the loader trusts: the file must decode that far.
        info = verify_video(data)
        n_at_fps = info.frames_at(fps)
        meta.update(
            fps=info.fps,
            num_frames=info.num_frames,
            width=info.width,
            height=info.height,
            duration=round(info.duration, 4),
        )
    if n_at_fps < min_frames:
        return "filtered_short"
    meta.update(
        motion=round(float(score), 4),
        motion_method="raft" if raft is not None else "framediff",
        frames_at_target_fps=n_at_fps,
        target_fps=fps,
    )
    return data, meta


def build_shard(job: dict) -> dict:
    """Probe, length-filter, motion-score, motion-filter, verify and write one shard of input items.

    ``job = {"index": i, "out": dir, "items": [[global_index, path_or_url, caption], ...],
    "opts": {...}}`` (`DEFAULT_OPTIONS` lists the options). Returns the shard's stats,
    which are also written next to the shards for the summary and resume. An input that
    cannot be read or decoded over the span the loader may read counts as failed.
    """
    t0 = time.time()
    opts, out, index = {**DEFAULT_OPTIONS, **job["opts"]}, job["out"], job["index"]
    if opts["torch_threads"]:
        torch.set_num_threads(int(opts["torch_threads"]))
    raft = (
        _raft_scorer(opts["raft"], opts["raft_arch"], opts["device"], int(opts["raft_iters"])) if opts["raft"] else None
    )
    stats, failures, samples = Counter(), [], []
    for gidx, path, caption in job["items"]:
        try:
            with wds.gopen(path, "rb") as fh:
                data = fh.read()
            kept = _kept_clip(data, path, opts, raft)
            if isinstance(kept, str):
                stats[kept] += 1
                continue
            data, meta = kept
            meta["caption"] = caption or ""
            samples.append({"__key__": f"{gidx:06d}", "mp4": data, "json": json.dumps(meta).encode()})
            stats["kept"] += 1
            stats["bytes"] += len(data)
        except ClipTooShortError:
            stats["filtered_short"] += 1
        except Exception as exc:  # a bad input is reported, never fatal for the build
            stats["failed"] += 1
            failures.append([path, f"{type(exc).__name__}: {exc}"[:300]])
    tar = f"{index:06d}.tar" if samples else None
    if samples:
        write_tar_atomic(os.path.join(out, tar), samples)
    result = {
        "index": index,
        "items": len(job["items"]),
        "tar": tar,
        "failures": failures,
        "seconds": round(time.time() - t0, 3),
    }
    result.update({k: int(stats[k]) for k in ("kept", "filtered_short", "filtered_motion", "failed", "bytes")})
    # Stats are written after the tar: their presence marks the shard as finished.
    path = build_stats_path(out, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(path + ".tmp", path)
    return result


# --------------------------------------------------------------------------- the run


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} then, {b!r} now)")
    return out


def run_build(
    items: list[tuple[str, str]],
    out: str,
    opts: dict,
    samples_per_shard: int = 200,
    workers: int = 1,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Build (or finish building) the shards of `items` into `out`; returns the summary.

    A re-run skips finished shards; a folder holding a build with other options or
    inputs raises FileExistsError unless `overwrite` (which discards it). `workers` > 1
    runs jobs in spawned processes. The summary (kept / filtered_short /
    filtered_motion / failed counts, failures, shard sizes) is also written to
    ``summary.json``.
    """
    unknown = set(opts) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown build option(s) {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not items:
        raise ValueError("no inputs to build")
    opts = {**DEFAULT_OPTIONS, **opts}
    os.makedirs(os.path.join(out, ".build"), exist_ok=True)
    # The build's identity: options + inputs. A re-run with another identity would mix
    # shards filtered differently, so it is refused unless overwrite.
    ident = {
        "opts": {k: v for k, v in opts.items() if k not in _RUNTIME_OPTIONS},
        "samples_per_shard": samples_per_shard,
        "inputs": hashlib.sha256("\n".join(p for p, _ in items).encode()).hexdigest(),
        "num_inputs": len(items),
    }
    ident_path = os.path.join(out, ".build", "config.json")
    if os.path.exists(ident_path):
        with open(ident_path) as fh:
            previous = json.load(fh)
        if previous != ident:
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds a build with other options or inputs ({ident_path}: "
                    f"{'; '.join(_identity_diff(previous, ident)[:4])}); use another --out or --overwrite"
                )
            for f in os.listdir(out):
                if f.endswith(".tar"):
                    os.remove(os.path.join(out, f))
            for f in os.listdir(os.path.join(out, ".build")):
                os.remove(os.path.join(out, ".build", f))
    with open(ident_path, "w") as fh:
        json.dump(ident, fh, indent=1)

    per = samples_per_shard
    jobs = [
        {
            "index": s,
            "out": out,
            "opts": opts,
            "items": [[i, items[i][0], items[i][1]] for i in range(s * per, min(len(items), (s + 1) * per))],
        }
        for s in range((len(items) + per - 1) // per)
    ]
    todo = [j for j in jobs if not shard_done(out, j["index"])]
    echo(
        f"{len(items)} inputs -> {len(jobs)} shards ({len(jobs) - len(todo)} already finished, {len(todo)} to build, {workers} workers)"
    )

    def report(result: dict) -> None:
        echo(
            f"shard {result['index']:06d}/{len(jobs)}: kept {result['kept']} of {result['items']} ({result['seconds']} s)"
        )

    t0 = time.time()
    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            report(build_shard(j))
    else:
        # spawn: workers must not inherit a parent's torch/OpenMP thread state (fork-unsafe)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            for fut in as_completed([pool.submit(build_shard, j) for j in todo]):
                report(fut.result())

    results = []
    for j in jobs:
        with open(build_stats_path(out, j["index"])) as fh:
            results.append(json.load(fh))
    summary = {
        k: sum(r[k] for r in results) for k in ("items", "kept", "filtered_short", "filtered_motion", "failed", "bytes")
    }
    shards = [r["tar"] for r in results if r["tar"]]
    summary.update(
        shards=len(shards),
        mean_shard_mb=round(summary["bytes"] / max(1, len(shards)) / 2**20, 3),
        built_now=len(todo),
        seconds=round(time.time() - t0, 2),
        failures=[f for r in results for f in r["failures"]][:100],
        options=ident,
    )
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    echo(
        f"kept {summary['kept']} / filtered short {summary['filtered_short']} / filtered motion {summary['filtered_motion']} / "
        f"failed {summary['failed']} of {summary['items']} inputs; {len(shards)} shards, {summary['mean_shard_mb']} MB each on average"
    )
    for path, reason in summary["failures"][:10]:
        echo(f"  failed: {path}: {reason}")
    return summary
