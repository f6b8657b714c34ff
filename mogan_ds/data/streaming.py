"""Shard listing and checking, rank/worker splitting and the resumable resampled sample stream.

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
are webdataset's (`wds.tarfile_samples`). `check_shard_source` resolves a shard spec up
front, so a wrong ``data.shards`` fails before any weights load rather than in a loader
worker after many empty draws.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

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


def is_remote(url: str) -> bool:
    """A URL webdataset opens through a scheme handler (http(s), pipe:, s3, gs, ...), not a local path."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def check_shard_source(spec: str | list[str], key: str = "data.shards") -> list[str]:
    """The shard URLs of `spec`, after checking that they resolve; raises naming `key`.

    Local shards must exist (directories must hold tars, globs must match); of remote
    ones (http(s), ``pipe:``, s3 ...) the first is opened and must yield data, which
    catches a wrong host, bucket or command without reading the whole list.
    FileNotFoundError (a user error for the command lines) for anything that does not
    resolve, an empty spec included.
    """
    try:
        urls = expand_shards(spec)
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(f"{key}: {exc}") from None
    local = [u[len("file://") :] if u.startswith("file://") else u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{key}: {len(missing)} of {len(urls)} shard file(s) do not exist: {shown} (from {spec!r})"
        )
    remote = [u for u in urls if is_remote(u)]
    if remote:
        try:
            with wds.gopen(remote[0], "rb") as fh:
                head = fh.read(512)  # one tar header block
        except Exception as exc:  # any scheme handler's failure (curl, pipe status, no handler) means unusable
            raise FileNotFoundError(
                f"{key}: cannot open the first remote shard {remote[0]}: {type(exc).__name__}: {exc}"
            ) from None
        if not head:
            raise FileNotFoundError(f"{key}: the first remote shard {remote[0]} is empty or unreachable")
    return urls


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
    (`shard_samples` first reopens a shard whose error looks transient.)
    """

    def __init__(self, url: str, stats: Counter):
        self.url, self.stats = url, stats

    def __call__(self, exn: Exception) -> bool:
        self.stats["shard_errors"] += 1
        # webdataset appends the url to exn.args; show the cause (OSError: its strerror)
        first = getattr(exn, "strerror", None) or (exn.args[0] if getattr(exn, "args", None) else exn)
        log.warning("skipping (rest of) shard %s: %s: %s", self.url, type(exn).__name__, first)
        return True


def shard_samples(
    url: str, start: int, stats: Counter, retries: int = 3, wait: float = 1.0
) -> Iterator[tuple[int, dict]]:
    """``(j, sample)`` of one shard for j >= `start`, reopened after a transient error.

    An ``OSError`` while opening or reading (the file vanished, an I/O error, a stale NFS
    handle) reopens the shard up to `retries` times, after `wait` seconds doubling each
    time (counted as ``shard_retries``), and goes on after the last sample handed out: a
    sample is handed out only once the next one (or the shard's clean end) shows it whole,
    so the one being read when the error came is read again. Any other error, and an
    ``OSError`` after the last retry, is counted as ``shard_errors`` and logged, and the
    rest of the shard is skipped (`ShardErrorHandler`): the stream goes on with the next draw.
    """
    nxt, attempt = start, 0
    give_up = ShardErrorHandler(url, stats)
    while True:
        transient: list[Exception] = []

        def handler(exn: Exception, attempt: int = attempt, transient: list = transient) -> bool:
            if isinstance(exn, OSError) and attempt < retries:
                transient.append(exn)
                return False  # stop this pass; reopened below
            return give_up(exn)

        held = None
        for j, sample in enumerate(wds.tarfile_samples([dict(url=url)], handler=handler)):
            if j < nxt:
                continue
            if held is not None:
                nxt = held[0] + 1
                yield held
            held = (j, sample)
        if not transient:
            if held is not None:
                yield held
            return
        attempt += 1
        stats["shard_retries"] += 1
        delay = wait * 2 ** (attempt - 1)
        exn = transient[0]
        log.warning(
            "shard %s: %s: %s; reopening in %.1f s (retry %d of %d)",
            url,
            type(exn).__name__,
            getattr(exn, "strerror", None) or exn,
            delay,
            attempt,
            retries,
        )
        time.sleep(delay)


def resumable_samples(
    slot: Slot,
    seed_key: tuple[int, ...],
    cursor: list[int],
    bufsize: int,
    stats: Counter,
    max_empty_draws: int | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
) -> Iterator[dict]:
    """Endless, block-shuffled raw samples of one slot; each carries ``__cursor__``.

    `seed_key` identifies the slot (seed, dp_rank, worker, stream tag); `cursor` is
    ``[block, draw, index, pos]`` as attached to the last consumed sample (``[0, 0, 0, 0]``
    for a fresh start). ``__sample_seed__`` is a per-sample key for any randomness the
    consumer applies (clip offsets), so it is reproduced on resume too. A shard that fails
    to open or read is retried (`shard_samples`: `retries`, `retry_wait`), then skipped and counted.
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
            for j, sample in shard_samples(urls[i], skip, fill_errors, retries, retry_wait):
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
        for d, j, sample in source:  # noqa: B007 - d, j (the raw position) are read after the loop
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


def iter_shard(url: str, handler: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard in order (errors raise unless a handler says otherwise)."""
    return wds.tarfile_samples([dict(url=url)], handler=handler or wds.reraise_exception)
