"""Shard listing, rank/worker splitting and the resumable resampled sample stream.

Both loaders (motion clips, prompt embeddings) read webdataset tar shards through
`resumable_samples`, which keeps three promises a cluster run needs:

* **Split by data-parallel slot, not global rank.** A slot is (dp_rank, logical worker).
  Shards are dealt to slots when there are enough of them; otherwise slots share
  shards and split their samples by position (`Slot`). Sequence-parallel peers pass
  the same dp_rank and therefore see the same clips. (`wds.split_by_node` would key on
  the global RANK.)
* **Resampled, never exhausted.** Each slot draws shards forever: draw d takes entry
  d % n of a permutation that is fixed per cycle d // n, so every shard of the slot is
  visited once per cycle and uneven shards never leave one rank waiting on another.
* **Exactly resumable.** Everything random is a function of (seed, dp_rank, worker, a
  position), never of process state. Samples are shuffled in consecutive blocks of
  `bufsize`; a cursor ``[block, draw, index, pos]`` (block number, raw position where the
  block starts, samples of the permuted block already emitted) is attached to every
  sample, and restarting from a cursor reads at most one shard prefix and one block.

Tar reading, URL opening (local paths, http(s), ``pipe:`` commands) and error handling
are webdataset's (`wds.tarfile_samples`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import Counter
from typing import Callable, Iterator, NamedTuple

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)

SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


# --------------------------------------------------------------------------- listing


def expand_shards(spec: str | list[str]) -> list[str]:
    """A shard spec -> the list of shard URLs/paths.

    Accepted: a list; a local directory (its tar files, sorted); a local glob; one or
    more webdataset specs joined by ``::`` (brace patterns ``a/{000000..000099}.tar``,
    http(s) URLs, ``pipe:`` commands).
    """
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    else:
        spec = str(spec).strip()
        if not spec:
            raise ValueError("no shards given (empty shard spec)")
        if os.path.isdir(spec):
            urls = sorted(p for pat in SHARD_PATTERNS for p in glob.glob(os.path.join(spec, pat)))
            if not urls:
                raise FileNotFoundError(f"shard directory {spec} holds no {'/'.join(SHARD_PATTERNS)} files")
        elif any(c in spec for c in "*?[") and "://" not in spec and not spec.startswith("pipe:"):
            urls = sorted(glob.glob(spec))
            if not urls:
                raise FileNotFoundError(f"shard glob {spec} matches nothing")
        else:
            urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls


def shards_fingerprint(urls: list[str]) -> str:
    """Identity of a shard list by base names (stable across mount points and hosts)."""
    h = hashlib.sha256("\n".join(os.path.basename(u.rstrip("/")) for u in urls).encode())
    return h.hexdigest()[:16]


class Slot(NamedTuple):
    """The part of a shard list one (dp rank, worker) reads.

    Sample j of ``urls[i]`` belongs to this slot when ``(offsets[i] + j) % mod == rem``.
    The offsets spread the shards that share samples evenly over the residues, so that
    with n such shards every slot gets samples once shards hold mod / n of them.
    """

    urls: list[str]
    mod: int
    rem: int
    offsets: list[int]

    def keeps(self, i: int, j: int) -> bool:
        return self.mod == 1 or (self.offsets[i] + j) % self.mod == self.rem


def slot_split(urls: list[str], dp_rank: int, dp_size: int, worker: int, num_workers: int) -> Slot:
    """The disjoint share of slot (dp_rank, worker) among dp_size x num_workers slots.

    A shard-level split where there are enough shards (first over ranks, then over the
    rank's workers); where there are not, a sample-level split (see `Slot`). No two
    slots share a sample, and together they cover every sample.
    """
    if not (0 <= dp_rank < dp_size and 0 <= worker < num_workers):
        raise ValueError(f"bad slot: dp_rank {dp_rank} of {dp_size}, worker {worker} of {num_workers}")
    everything = list(range(len(urls)))
    idx, mod, rem = everything, 1, 0
    if len(idx) >= dp_size:
        idx = idx[dp_rank::dp_size]
    else:
        mod, rem = dp_size, dp_rank
    pool = idx  # the shards whose samples are shared, if any split is by sample
    if len(idx) >= num_workers:
        idx = idx[worker::num_workers]
    else:
        mod, rem = mod * num_workers, rem * num_workers + worker
    if mod > 1 and len(everything) < dp_size:
        pool = everything  # ranks already split samples of every shard
    offsets = [pool.index(i) * mod // len(pool) if mod > 1 else 0 for i in idx]
    return Slot([urls[i] for i in idx], mod, rem, offsets)


# --------------------------------------------------------------------------- streaming


def rng_for(*parts: int) -> np.random.Generator:
    """A generator that is a pure function of its integer key (no process state)."""
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


class ShardErrorHandler:
    """webdataset exception handler for one shard: count, log with the shard's name, go on.

    A bad shard is drawn again once per cycle, so it is reported once per cycle.
    """

    def __init__(self, url: str, stats: Counter):
        self.url, self.stats = url, stats

    def __call__(self, exn: Exception) -> bool:
        self.stats["shard_errors"] += 1
        # webdataset appends the url to exn.args; show the cause (OSError: its strerror)
        first = getattr(exn, "strerror", None) or (exn.args[0] if getattr(exn, "args", None) else exn)
        log.warning("skipping (rest of) shard %s: %s: %s", self.url, type(exn).__name__, first)
        return True


def resumable_samples(
    slot: Slot,
    seed_key: tuple[int, ...],
    cursor: list[int],
    bufsize: int,
    stats: Counter,
    max_empty_draws: int | None = None,
) -> Iterator[dict]:
    """Endless, block-shuffled raw samples of one slot; each carries ``__cursor__``.

    `seed_key` identifies the slot (seed, dp_rank, worker, stream tag); `cursor` is
    ``[block, draw, index, pos]`` as attached to the last consumed sample (``[0, 0, 0, 0]``
    for a fresh start). ``__sample_seed__`` is a per-sample key for any randomness the
    consumer applies (clip offsets), so it is reproduced on resume too.
    """
    urls, n = slot.urls, len(slot.urls)
    if n == 0:
        raise ValueError("no shards for this slot")
    bufsize = max(1, int(bufsize))
    max_empty = max_empty_draws or max(64, 4 * n)
    perm_cache: dict[int, np.ndarray] = {}
    # Shard errors met while filling a block are held here and merged once the block is
    # full, except for the block a resume re-reads (its errors are already in the stats).
    fill_errors: Counter = Counter()

    def shard_of(draw: int) -> int:
        cycle, j = divmod(draw, n)
        if cycle not in perm_cache:
            perm_cache.clear()
            perm_cache[cycle] = rng_for(*seed_key, 0x5A4D, cycle).permutation(n)
        return int(perm_cache[cycle][j])

    def raw(draw: int, skip: int) -> Iterator[tuple[int, int, dict]]:
        empty = 0
        while True:
            i, got = shard_of(draw), 0
            url = urls[i]
            handler = ShardErrorHandler(url, fill_errors)
            for j, sample in enumerate(wds.tarfile_samples([dict(url=url)], handler=handler)):
                if j < skip:
                    continue
                if not slot.keeps(i, j):
                    continue
                got += 1
                yield draw, j, sample
            empty = 0 if got or skip else empty + 1
            if empty >= max_empty:
                raise RuntimeError(
                    f"{empty} consecutive shard draws gave no sample for this slot (seed key {seed_key}, split {slot.rem} mod {slot.mod}, "
                    f"{n} shards, e.g. {urls[0]}): shards unreadable, or fewer samples than data-parallel ranks x workers"
                )
            draw, skip = draw + 1, 0

    block, draw, index, pos = (int(c) for c in cursor)
    source = raw(draw, index)
    while True:
        buf = []
        for d, j, sample in source:
            buf.append(sample)
            if len(buf) == bufsize:
                break
        if pos == 0:
            stats.update(fill_errors)
        fill_errors.clear()
        next_draw, next_index = d, j + 1  # raw position right after this block
        order = rng_for(*seed_key, 0x5348, block).permutation(len(buf)) if len(buf) > 1 else [0]
        for p in range(pos, len(buf)):
            sample = buf[order[p]]
            last = p == len(buf) - 1
            sample["__cursor__"] = [block + 1, next_draw, next_index, 0] if last else [block, draw, index, p + 1]
            sample["__sample_seed__"] = (block, p)
            stats["samples"] += 1
            yield sample
        block, draw, index, pos = block + 1, next_draw, next_index, 0


# --------------------------------------------------------------------------- writing


def write_tar_atomic(path: str, samples: list[dict] | Iterator[dict]) -> int:
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


def iter_shard(url: str, handler: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard in order (errors raise unless a handler says otherwise)."""
    return wds.tarfile_samples([dict(url=url)], handler=handler or wds.reraise_exception)


# --------------------------------------------------------------------------- building
#
# One job = one output shard = a fixed run of input items, so a re-run knows from the
# files alone which shards are finished, and parallel workers never share a shard.

_RAFT = {}


def _raft_for(opts: dict):
    if not opts.get("raft"):
        return None
    key = (opts["raft"], opts["raft_arch"], opts["device"])
    if key not in _RAFT:
        from .video import RaftMotion

        _RAFT[key] = RaftMotion(opts["raft"], opts["raft_arch"], opts["device"], iters=opts.get("raft_iters", 12))
    return _RAFT[key]


def build_stats_path(out: str, index: int) -> str:
    return os.path.join(out, ".build", f"{index:06d}.json")


def shard_done(out: str, index: int) -> bool:
    """A shard is finished when its stats exist and its tar (if any clip was kept) too."""
    import json

    p = build_stats_path(out, index)
    if not os.path.exists(p):
        return False
    with open(p) as fh:
        tar = json.load(fh).get("tar")
    return tar is None or os.path.exists(os.path.join(out, tar))


def build_shard(job: dict) -> dict:
    """Probe, length-filter, motion-score, motion-filter and write one shard of input items.

    ``job = {"index": i, "out": dir, "items": [[global_index, path_or_url, caption], ...],
    "opts": {...}}`` (see data_tools/build_shards.py for the options). Returns the
    shard's stats, which are also written next to the shards for the summary and resume.
    """
    import json
    import time

    from .video import ClipTooShortError, encode_mp4, iter_frames, motion_score, probe_video, analysis_size

    t0 = time.time()
    opts, out, index = job["opts"], job["out"], job["index"]
    if opts.get("torch_threads"):
        import torch

        torch.set_num_threads(int(opts["torch_threads"]))
    raft = _raft_for(opts)
    fps, stats, failures, samples = float(opts["fps"]), Counter(), [], []
    for gidx, path, caption in job["items"]:
        try:
            with wds.gopen(path, "rb") as fh:
                data = fh.read()
            info = probe_video(data)
            n_at_fps = info.frames_at(fps)
            if n_at_fps < opts["min_frames"]:
                stats["filtered_short"] += 1
                continue
            score = motion_score(data, fps, max_frames=opts["score_frames"], raft=raft)
            if score < opts["min_motion"]:
                stats["filtered_motion"] += 1
                continue
            meta = {"source": path, "fps": info.fps, "num_frames": info.num_frames, "width": info.width, "height": info.height, "duration": round(info.duration, 4)}
            if opts["transcode"] or "mp4" not in info.format.split(","):
                h, w = analysis_size(info.height, info.width, opts["short_side"]) if opts["short_side"] else (info.height - info.height % 2, info.width - info.width % 2)
                frames = np.stack(list(iter_frames(data, fps=fps, height=h, width=w, max_frames=opts["max_frames"] or None)))
                data = encode_mp4(frames, fps, crf=opts["crf"], preset=opts["preset"])
                meta.update(fps=fps, num_frames=int(frames.shape[0]), width=w, height=h, duration=round(frames.shape[0] / fps, 4))
            meta.update(
                caption=caption or "",
                motion=round(float(score), 4),
                motion_method="raft" if raft is not None else "framediff",
                frames_at_target_fps=n_at_fps,
                target_fps=fps,
            )
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
    result = {"index": index, "items": len(job["items"]), "tar": tar, "failures": failures, "seconds": round(time.time() - t0, 3)}
    result.update({k: int(stats[k]) for k in ("kept", "filtered_short", "filtered_motion", "failed", "bytes")})
    # Stats are written after the tar: their presence marks the shard as finished.
    path = build_stats_path(out, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(path + ".tmp", path)
    return result
