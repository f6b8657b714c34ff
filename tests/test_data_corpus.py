"""The streaming clip loader: build -> stream -> clip values, skips, rank split, exact resume."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch

from mogan_ds.data.corpus import MotionClipStream
from mogan_ds.data.shards import expand_shards, iter_shard, write_tar_atomic
from mogan_ds.data.video import encode_mp4, write_mp4

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_tools"))
import build_shards  # noqa: E402

SRC_FPS, SRC_FRAMES = 16, 24


def level_clip(seed: int) -> np.ndarray:
    """Background grey 20 + 8 i in frame i (readable after decoding), a square moving in the middle rows."""
    frames = np.empty((SRC_FRAMES, 96, 128, 3), np.uint8)
    for i in range(SRC_FRAMES):
        frames[i] = 20 + 8 * i
        x0 = 10 + (3 + seed) * i
        frames[i, 40:56, max(0, x0) : x0 + 16] = (230, 60, 60)
    return frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 real encoded videos through data_tools/build_shards.py: 4 shards of 2 samples."""
    d = tmp_path_factory.mktemp("corpus")
    for v in range(8):
        write_mp4(d / "videos" / f"v{v}.mp4", level_clip(v), fps=SRC_FPS, crf=10)
    build_shards.main(["--input", str(d / "videos"), "--out", str(d / "shards"), "--fps", "8", "--min-frames", "9", "--samples-per-shard", "2", "--workers", "1"])
    return str(d / "shards")


def stream(shards, **kw):
    args = dict(num_frames=5, fps=8, height=64, width=64, dp_rank=0, dp_size=1, seed=0, num_workers=0, batch_size=2, shuffle_buffer=4, epoch_samples=6)
    args.update(kw)
    return MotionClipStream(shards, **args)


def take(s, n):
    out = []
    for batch in s:
        out.append(batch)
        if len(out) == n:
            return out


def test_round_trip_build_stream_clip_values(corpus):
    batches = take(stream(corpus), 4)
    for b in batches:
        v = b["video"]
        assert v.shape == (2, 3, 5, 64, 64) and v.dtype == torch.float32 and v.min() >= -1 and v.max() <= 1
        assert b["motion"].shape == (2,) and (b["motion"] > 0).all()
        # the top rows are background: their grey level says which source frame was decoded
        grey = ((v[:, 1, :, :4, :].mean(dim=(-1, -2)) + 1) * 127.5).numpy()
        index = np.round((grey - 20) / 8)
        assert np.abs(grey - (20 + 8 * index)).max() < 3
        # 16 fps source read at 8 fps: every second frame, from a random start
        assert (np.diff(index, axis=1) == 2).all()
    starts = {int(i) for b in batches for i in np.round((((b["video"][:, 1, 0, :4].mean(dim=(-1, -2)) + 1) * 127.5).numpy() - 20) / 8)}
    assert len(starts) > 1  # offsets are drawn, not always 0
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys)  # 8 clips, 8 draws from one cycle: no repeats
    # uint8 output (for conversion on the GPU) carries the same values
    raw = take(stream(corpus, output_dtype=torch.uint8), 1)[0]["video"]
    assert raw.dtype == torch.uint8 and torch.equal(raw.float() / 127.5 - 1, batches[0]["video"])


@pytest.fixture(scope="module")
def dirty(corpus, tmp_path_factory):
    """A shard of good and bad samples, plus a shard path that does not exist."""
    d = tmp_path_factory.mktemp("dirty")
    good = [(s["mp4"], s["json"]) for s in iter_shard(expand_shards(corpus)[0])]
    short = encode_mp4(level_clip(0)[:3], fps=SRC_FPS)
    meta = json.dumps({"fps": 16.0, "num_frames": 24, "motion": 2.0}).encode()
    samples = [
        {"__key__": "good0", "mp4": good[0][0], "json": good[0][1]},
        {"__key__": "good1", "mp4": good[1][0], "json": good[1][1]},
        {"__key__": "garbage", "mp4": b"\x00garbage" * 64, "json": meta},
        {"__key__": "truncated", "mp4": good[0][0][:2000], "json": meta},
        {"__key__": "nomp4", "json": meta},
        {"__key__": "badjson", "mp4": good[0][0], "json": b"{not json"},
        {"__key__": "short", "mp4": short, "json": json.dumps({"fps": 16.0, "num_frames": 3, "motion": 2.0}).encode()},
        {"__key__": "liar", "mp4": short, "json": meta},  # metadata claims 24 frames, the video has 3
        {"__key__": "still", "mp4": good[0][0], "json": json.dumps({"fps": 16.0, "num_frames": 24, "motion": 0.01}).encode()},
        {"__key__": "nometa", "mp4": good[1][0]},  # no json: the container header is probed
    ]
    write_tar_atomic(str(d / "000000.tar"), samples)
    return [str(d / "000000.tar"), str(d / "missing-000001.tar")]


def test_bad_samples_are_skipped_counted_and_logged(dirty, caplog):
    caplog.set_level(logging.WARNING, logger="mogan_ds.data")
    s = stream(dirty, min_motion=0.5, batch_size=1, shuffle_buffer=1, epoch_samples=100)
    keys = [b["key"][0] for b in take(s, 9)]
    assert set(keys) == {"good0", "good1"}  # under a motion filter, an unknown score does not pass
    st = s.stats()
    assert st["decoded"] == 9 and st["skipped_corrupt"] >= 4 and st["skipped_short"] >= 2
    assert st["skipped_low_motion"] >= 1 and st["shard_errors"] >= 1
    assert st["samples"] == st["decoded"] + st["skipped_corrupt"] + st["skipped_short"] + st["skipped_low_motion"]
    text = caplog.text
    assert "missing-000001.tar" in text  # an unopenable shard is named
    assert "skipped_corrupt" in text and "garbage" in text and "skipped_short" in text
    # without the filter, the json-less sample decodes (its header is probed instead)
    assert "nometa" in keys_of(take(stream(dirty, batch_size=1, shuffle_buffer=1), 6))


def test_nothing_readable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(RuntimeError, match="consecutive shard draws"):
        take(stream(str(tmp_path)), 1)


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core box, on purpose
@pytest.mark.parametrize("workers", [2, 3])
def test_data_parallel_ranks_see_disjoint_samples(corpus, workers):
    # 4 shards: with 2 workers every (rank, worker) slot owns a shard; with 3 the
    # workers of a rank split their 2 shards by key hash.
    per_rank = [keys_of(take(stream(corpus, dp_rank=r, dp_size=2, num_workers=workers, batch_size=1, epoch_samples=12), 12)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {f"{i:06d}" for i in range(8)}
    # a sequence-parallel peer passes the same dp_rank and gets the same clips
    peer = take(stream(corpus, dp_rank=1, dp_size=2, num_workers=workers, batch_size=1, epoch_samples=12), 4)
    assert keys_of(peer) == per_rank[1][:4]


def test_resume_from_a_saved_position_yields_the_same_batches(corpus):
    kw = dict(num_workers=2, seed=5, epoch_samples=6)  # 3 batches an epoch: resumes cross epochs
    ref = stream(corpus, **kw)
    head = take(ref, 4)
    state = json.loads(json.dumps(ref.state_dict()))  # what a checkpoint stores survives JSON
    tail = take(ref, 5)
    assert ref.epoch == 3 and ref.stats()["batches"] == 9

    resumed = stream(corpus, **kw)
    resumed.load_state_dict(state)
    again = take(resumed, 5)
    assert keys_of(again) == keys_of(tail)
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(again, tail))
    assert resumed.stats() == ref.stats()
    # an uninterrupted stream with the same seed agrees too, and another seed does not
    assert keys_of(take(stream(corpus, **kw), 9)) == keys_of(head + tail)
    assert keys_of(take(stream(corpus, **{**kw, "seed": 6}), 9)) != keys_of(head + tail)
    with pytest.raises(ValueError, match="batch_size"):
        stream(corpus, **{**kw, "batch_size": 3}).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank"):
        stream(corpus, **{**kw, "dp_rank": 1, "dp_size": 2}).load_state_dict(state)
