"""The streaming clip loader: build -> stream -> clip values, skips, rank split, exact resume;
shard sources checked before the trainer loads any weights."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import clip_stream as stream

import mogan_ds.train.networks as networks_mod
import mogan_ds.train.trainer as trainer_mod
from mogan_ds.cli.launcher import REPO
from mogan_ds.config import DataConfig, VideoConfig, load_config
from mogan_ds.data.corpus import MotionClipStream
from mogan_ds.data.prompts import NegativePromptMismatchError
from mogan_ds.data.shard_build import read_inputs, run_build, write_tar_atomic
from mogan_ds.data.streaming import check_shard_source, expand_shards, iter_shard
from mogan_ds.data.video import encode_mp4, write_mp4

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
    """8 real encoded videos through the shard builder: 4 shards of 2 samples."""
    d = tmp_path_factory.mktemp("corpus")
    for v in range(8):
        write_mp4(d / "videos" / f"v{v}.mp4", level_clip(v), fps=SRC_FPS, crf=10)
    run_build(
        read_inputs(str(d / "videos")),
        str(d / "shards"),
        {"fps": 8, "min_frames": 9},
        samples_per_shard=2,
        echo=lambda s: None,
    )
    return str(d / "shards")


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
    starts = {
        int(i)
        for b in batches
        for i in np.round((((b["video"][:, 1, 0, :4].mean(dim=(-1, -2)) + 1) * 127.5).numpy() - 20) / 8)
    }
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
        {
            "__key__": "still",
            "mp4": good[0][0],
            "json": json.dumps({"fps": 16.0, "num_frames": 24, "motion": 0.01}).encode(),
        },
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
    per_rank = [
        keys_of(take(stream(corpus, dp_rank=r, dp_size=2, num_workers=workers, batch_size=1, epoch_samples=12), 12))
        for r in range(2)
    ]
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


def test_constructor_is_keyword_only_and_from_config_reads_the_recipe(corpus):
    with pytest.raises(TypeError):
        MotionClipStream(corpus, 5, 8, 64, 64, 0, 1, 0, 0, 2, 4, 6)  # the old positional call
    # a recipe's sections (at 64 px, below what recipe validation allows for RAFT)
    data = DataConfig(shards=corpus, num_workers=0, shuffle_buffer=4, epoch_samples=6)
    video = VideoConfig(num_frames=5, fps=8, height=64, width=64)
    s = MotionClipStream.from_config(data, video, dp_rank=0, dp_size=1, seed=0, batch_size=2)
    assert keys_of(take(s, 3)) == keys_of(take(stream(corpus), 3))  # the same stream as the explicit arguments


def test_shard_sources_are_checked_up_front(corpus, tmp_path):
    urls = expand_shards(corpus)
    assert check_shard_source(corpus) == urls and check_shard_source(urls) == urls
    with pytest.raises(
        FileNotFoundError, match=r"data.shards: .*1 of 1 shard file\(s\) do not exist: /nonexistent/motion"
    ):
        check_shard_source("/nonexistent/motion")
    with pytest.raises(FileNotFoundError, match="data.shards: shard glob .* matches nothing"):
        check_shard_source(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="data.shards: shard directory .* holds no"):
        check_shard_source(str(tmp_path))
    # a brace pattern naming one missing shard among real ones is caught too
    with pytest.raises(FileNotFoundError, match="1 of 5 shard file"):
        check_shard_source(corpus + "/{000000..000004}.tar")
    with pytest.raises(FileNotFoundError, match="data.shards: no shards given"):
        check_shard_source("")
    # remote sources: the first one is opened (a pipe: here; http(s) goes through curl the same way)
    assert check_shard_source(f"pipe:cat {urls[0]}") == [f"pipe:cat {urls[0]}"]
    with pytest.raises(FileNotFoundError, match="cannot open the first remote shard pipe:cat /nonexistent.tar"):
        check_shard_source("pipe:cat /nonexistent.tar")
    with pytest.raises(FileNotFoundError, match="cannot open the first remote shard s3://"):
        check_shard_source("s3://bucket/shard-000000.tar")  # no s3 handler: the loader could not read it either
    with pytest.raises(FileNotFoundError, match="is empty"):
        check_shard_source("pipe:true")


def test_trainer_checks_shards_and_negative_prompt_before_building_networks(tiny_workdir, tmp_path, monkeypatch):
    def no_networks(*a, **k):
        raise AssertionError("networks were built before the data sources were checked")

    monkeypatch.setattr(networks_mod, "build_networks", no_networks)
    if hasattr(trainer_mod, "build_networks"):
        monkeypatch.setattr(trainer_mod, "build_networks", no_networks)
    ds = str(REPO / "ds_configs" / "zero3_cpu.json")

    def trainer(*overrides):
        cfg = load_config(
            "tiny", [*tiny_workdir, f"output.run_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled", *overrides]
        )
        return trainer_mod.MoGANTrainer(cfg, ds)

    with pytest.raises(FileNotFoundError, match="data.shards: .*/nonexistent/shards"):
        trainer("data.shards=/nonexistent/shards")
    with pytest.raises(
        NegativePromptMismatchError,
        match=r"text.negative_prompt is the empty prompt, .*\(data.prompts\) were encoded with Wan's standard",
    ):
        trainer("text.negative_prompt=")
    # without the GAN phases the corpus is never read, so it is not required
    with pytest.raises(AssertionError, match="networks were built"):
        trainer("data.shards=/nonexistent/shards", "gan.enabled=false")
