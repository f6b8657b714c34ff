"""The streaming loader of real motion clips (the discriminator's "real" side).

``MotionClipStream`` is a webdataset pipeline per loader worker: resumable resampled
shard draws split by data-parallel rank and worker (`streaming.resumable_samples`), webdataset's
tar reader, a motion-score select, PyAV decoding of just the clip's frames, and
``wds.batched``; workers run under ``wds.WebLoader`` with ``with_epoch``.

Exact resume. Every worker stream is a pure function of (seed, dp_rank, logical
worker) and a cursor, and each batch carries its worker's cursor and counters. The
DataLoader hands out batches round-robin over workers, so batch k comes from logical
worker k mod W. The main process records, per logical worker, the state of the last
batch it *yielded* (prefetched batches are not counted); restoring restarts each
worker from its cursor and rotates the physical -> logical worker map so that the next
batch comes from the right worker. Epoch boundaries use the same mechanism, so a
resumed stream and an uninterrupted one are the same stream. The state is only valid
for the same shards, seed, dp rank/size, worker count, batch size and shuffle buffer;
`load_state_dict` checks that.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter

import torch
import webdataset as wds

from .streaming import expand_shards, resumable_samples, rng_for, shards_fingerprint, slot_split
from .video import ClipTooShortError, VideoDecodeError, decode_clip, probe_video, to_unit

log = logging.getLogger(__name__)

STAT_KEYS = (
    "samples",
    "decoded",
    "skipped_corrupt",
    "skipped_short",
    "skipped_low_motion",
    "shard_errors",
    "shard_retries",
)
_TAG_CLIPS, _TAG_OFFSET = 0xC11B, 0x0FF5


class _ClipWorkerDataset(torch.utils.data.IterableDataset):
    """What one loader worker (or the main process, with 0 workers) iterates."""

    def __init__(
        self,
        urls,
        *,
        num_frames,
        fps,
        height,
        width,
        dp_rank,
        dp_size,
        seed,
        logical_workers,
        batch_size,
        shuffle_buffer,
        min_motion,
        decode_threads,
        log_skips,
        shard_retries=3,
        shard_retry_wait=1.0,
    ):
        super().__init__()
        self.urls, self.num_frames, self.fps, self.height, self.width = urls, num_frames, fps, height, width
        self.dp_rank, self.dp_size, self.seed, self.logical_workers = dp_rank, dp_size, seed, logical_workers
        self.batch_size, self.shuffle_buffer, self.min_motion = batch_size, shuffle_buffer, min_motion
        self.decode_threads, self.log_skips = decode_threads, log_skips
        self.shard_retries, self.shard_retry_wait = shard_retries, shard_retry_wait
        # set by the main process before each epoch's workers start (they get a copy)
        self.start_states: dict[int, dict] = {}
        self.rotation = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.logical_workers
        state = self.start_states.get(worker) or {"cursor": [0, 0, 0, 0], "stats": {}}
        stats = Counter({k: 0 for k in STAT_KEYS})
        stats.update(state["stats"])
        slot = slot_split(self.urls, self.dp_rank, self.dp_size, worker, self.logical_workers)
        seed_key = (self.seed, self.dp_rank, worker, _TAG_CLIPS)
        pipeline = wds.DataPipeline(
            lambda: resumable_samples(
                slot,
                seed_key,
                state["cursor"],
                self.shuffle_buffer,
                stats,
                retries=self.shard_retries,
                retry_wait=self.shard_retry_wait,
            ),
            lambda src: self._decoded(src, stats, seed_key),
            wds.batched(self.batch_size, collation_fn=lambda samples: self._collate(samples, worker), partial=False),
        )
        return iter(pipeline)

    def _skip(self, stats: Counter, kind: str, sample: dict, why) -> None:
        stats[kind] += 1
        # every skip is counted; the first few of each kind per worker are logged in full
        level = logging.WARNING if stats[kind] <= self.log_skips else logging.DEBUG
        log.log(level, "%s: %s/%s: %s", kind, sample.get("__url__"), sample.get("__key__"), why)

    def _decoded(self, src, stats: Counter, seed_key):
        F, fps = self.num_frames, self.fps
        for sample in src:
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                if not isinstance(meta, dict):
                    raise ValueError("json is not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                self._skip(stats, "skipped_corrupt", sample, f"bad json: {exc}")
                continue
            motion = meta.get("motion")
            motion = float(motion) if isinstance(motion, (int, float)) else math.nan
            if self.min_motion > 0 and not motion >= self.min_motion:
                self._skip(stats, "skipped_low_motion", sample, f"motion {motion} < {self.min_motion}")
                continue
            data = sample.get("mp4")
            if not data:
                self._skip(stats, "skipped_corrupt", sample, "no .mp4 member")
                continue
            try:
                if (
                    isinstance(meta.get("fps"), (int, float))
                    and isinstance(meta.get("num_frames"), int)
                    and meta["fps"] > 0
                ):
                    src_fps, src_frames = float(meta["fps"]), meta["num_frames"]
                else:  # no usable metadata: read the container header
                    probe = probe_video(data)
                    src_fps, src_frames = probe.fps, probe.num_frames
                # latest start whose last frame still lies within the video (half-frame hold)
                max_start = (src_frames - 0.5) / src_fps - (F - 1) / fps
                if max_start < 0:
                    raise ClipTooShortError(f"{src_frames} frames at {src_fps} fps < {F} frames at {fps} fps")
                u = rng_for(*seed_key, _TAG_OFFSET, *sample["__sample_seed__"]).random()
                frames = decode_clip(
                    data, F, fps, self.height, self.width, start=u * max_start, threads=self.decode_threads
                )
            except ClipTooShortError as exc:
                self._skip(stats, "skipped_short", sample, exc)
                continue
            except (VideoDecodeError, ValueError, OSError) as exc:
                self._skip(stats, "skipped_corrupt", sample, exc)
                continue
            stats["decoded"] += 1
            yield {
                "frames": frames,
                "key": sample["__key__"],
                "motion": motion,
                "__cursor__": sample["__cursor__"],
                "__stats__": dict(stats),  # snapshot: exactly the work up to this sample
            }

    @staticmethod
    def _collate(samples: list[dict], worker: int) -> dict:
        f, h, w, c = samples[0]["frames"].shape
        video = torch.empty((len(samples), c, f, h, w), dtype=torch.uint8)
        for i, s in enumerate(samples):  # one strided copy per clip, straight into [B, 3, F, H, W]
            video[i].copy_(torch.from_numpy(s["frames"]).permute(3, 0, 1, 2))
        return {
            "video": video,  # uint8 [B, 3, F, H, W]: 4x less inter-process traffic than float
            "key": [s["key"] for s in samples],
            "motion": torch.tensor([s["motion"] for s in samples], dtype=torch.float32),
            "__worker__": worker,
            "__state__": {"cursor": list(samples[-1]["__cursor__"]), "stats": samples[-1]["__stats__"]},
        }


class MotionClipStream:
    """Endless batches of real clips for one data-parallel rank.

    Yields ``{"video": float [B, 3, F, H, W] in [-1, 1], "key": list[str], "motion": [B]}``.
    A clip is `num_frames` frames at `fps` from a seeded random start, resized to cover
    and centre-cropped to `height` x `width`. Corrupt, unreadable, too-short and (with
    `min_motion` > 0) low-motion samples are skipped and counted (`stats()`).
    `epoch_samples` sets the nominal epoch (clips per rank) of the resampled stream;
    iteration continues across epochs. `decode_threads` is FFmpeg's threads per worker.

    Workers ship uint8 clips (4x less shared memory than float); the main process
    converts them. With ``output_dtype=torch.uint8`` it does not, and "video" holds
    [0, 255] values for the caller to convert on the GPU (`video.to_unit`): at 480p the
    CPU conversion costs ~0.2 s per clip on the training process.

    Arguments after `shards` are keyword-only; `from_config` builds the stream from a
    recipe's ``data`` and ``video`` sections.
    """

    @classmethod
    def from_config(
        cls, data, video, *, dp_rank: int, dp_size: int, seed: int, batch_size: int, **kwargs
    ) -> MotionClipStream:
        """The stream of a recipe: `data` is its DataConfig (shards, workers, buffer, epoch,
        min_motion), `video` its VideoConfig (frames, fps, size); `kwargs` pass through."""
        return cls(
            data.shards,
            num_frames=video.num_frames,
            fps=video.fps,
            height=video.height,
            width=video.width,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            num_workers=data.num_workers,
            batch_size=batch_size,
            shuffle_buffer=data.shuffle_buffer,
            epoch_samples=data.epoch_samples,
            min_motion=data.min_motion,
            shard_retries=data.shard_retries,
            shard_retry_wait=data.shard_retry_wait,
            **kwargs,
        )

    def __init__(
        self,
        shards,
        *,
        num_frames: int,
        fps: float,
        height: int,
        width: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int,
        batch_size: int,
        shuffle_buffer: int,
        epoch_samples: int,
        min_motion: float = 0.0,
        decode_threads: int = 1,
        prefetch_factor: int = 2,
        log_skips: int = 10,
        shard_retries: int = 3,
        shard_retry_wait: float = 1.0,
        output_dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1 or num_frames < 1 or fps <= 0 or height < 1 or width < 1 or num_workers < 0:
            raise ValueError("need batch_size, num_frames, height, width >= 1, fps > 0 and num_workers >= 0")
        self.urls = expand_shards(shards)
        self.num_workers, self.batch_size = num_workers, batch_size
        self.logical_workers = max(1, num_workers)
        self.batches_per_epoch = max(1, math.ceil(epoch_samples / batch_size))
        self.prefetch_factor = prefetch_factor
        if output_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
            raise ValueError(f"output_dtype must be float32, float16, bfloat16 or uint8, got {output_dtype}")
        self.output_dtype = output_dtype
        self.dataset = _ClipWorkerDataset(
            self.urls,
            num_frames=num_frames,
            fps=fps,
            height=height,
            width=width,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            logical_workers=self.logical_workers,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            min_motion=min_motion,
            decode_threads=decode_threads,
            log_skips=log_skips,
            shard_retries=shard_retries,
            shard_retry_wait=shard_retry_wait,
        )
        self._identity = {
            "shards": shards_fingerprint(self.urls),
            "seed": seed,
            "dp_rank": dp_rank,
            "dp_size": dp_size,
            "workers": self.logical_workers,
            "batch_size": batch_size,
            "shuffle_buffer": shuffle_buffer,
            "clip": [num_frames, fps, height, width],
            "min_motion": min_motion,
        }
        self._workers: dict[int, dict] = {}
        self._batches = 0  # batches yielded in total (decides which worker is next)
        self._epoch = 0
        self._in_epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self):
        while True:
            self.dataset.start_states = copy.deepcopy(self._workers)
            self.dataset.rotation = self._batches % self.logical_workers
            kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
            loader = wds.WebLoader(self.dataset, batch_size=None, num_workers=self.num_workers, **kwargs)
            loader = loader.with_epoch(self.batches_per_epoch - self._in_epoch)
            for batch in loader:
                self._workers[batch.pop("__worker__")] = batch.pop("__state__")
                self._batches += 1
                self._in_epoch += 1
                if self._in_epoch == self.batches_per_epoch:  # the loader ends after this batch
                    self._epoch, self._in_epoch = self._epoch + 1, 0
                if self.output_dtype != torch.uint8:
                    batch["video"] = to_unit(batch["video"], self.output_dtype)
                yield batch

    def state_dict(self) -> dict:
        """The position after the last yielded batch (plain Python types)."""
        return {
            "identity": dict(self._identity),
            "batches": self._batches,
            "epoch": self._epoch,
            "in_epoch": self._in_epoch,
            "workers": {str(k): copy.deepcopy(v) for k, v in self._workers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; takes effect at the next ``iter(stream)``."""
        ident = state.get("identity", {})
        diff = {
            k: (ident.get(k), v)
            for k, v in self._identity.items()
            if ident.get(k) != v and not (isinstance(v, list) and list(ident.get(k) or []) == v)
        }
        if diff:
            raise ValueError(
                "data state was saved for another stream; (saved, now) differ in "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        self._batches, self._epoch, self._in_epoch = int(state["batches"]), int(state["epoch"]), int(state["in_epoch"])
        self._workers = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}

    def stats(self) -> dict:
        """Counters summed over workers, as of the last yielded batch."""
        total = Counter({k: 0 for k in STAT_KEYS})
        for w in self._workers.values():
            total.update(w["stats"])
        return {**total, "batches": self._batches, "epoch": self._epoch}
