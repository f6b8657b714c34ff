"""Shared fixtures: tiny models are written once per test session (same loading path as real weights)."""

import os

# OpenMP threads that busy-wait between parallel regions starve the other processes of a
# 2-core machine (launcher ranks, loader workers): a RAFT test took 29 s instead of 0.6 s.
# Set before torch loads OpenMP; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A trainer in one process for one step of the smallest work (tests/test_trainer.py, test_precision.py).
FAST = [
    "train.batch_size=1",
    "dmd.critic_updates=1",
    "logging.sample_every=0",
    "logging.wandb_mode=disabled",
    "data.num_workers=0",
    "train.max_steps=1",
]


def clip_stream(shards, **kw):
    """A MotionClipStream over small test shards (64x64, 5 frames at 8 fps, one rank); `kw` overrides."""
    from mogan_ds.data.corpus import MotionClipStream

    args = dict(
        num_frames=5,
        fps=8,
        height=64,
        width=64,
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=0,
        batch_size=2,
        shuffle_buffer=4,
        epoch_samples=6,
    )
    args.update(kw)
    return MotionClipStream(shards, **args)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with wan/ (WanPipeline layout), generator/ and raft_small.pth."""
    from mogan_ds.models.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """Tiny models + a small synthetic shard set + prompt embeddings; returns the recipe overrides."""
    from mogan_ds.cli.demo import prepare_tiny_workdir, tiny_overrides

    paths = prepare_tiny_workdir(tmp_path_factory.mktemp("tiny_workdir"), clips=12, frames=16)
    return tiny_overrides(paths)
