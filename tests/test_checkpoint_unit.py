"""CheckpointManager without DeepSpeed: atomicity, keep-N, newest-complete selection, RNG."""

import random
from pathlib import Path

import pytest
import torch

from mogan_ds.checkpoint.manager import CheckpointManager


class FakeEngine:
    """Stands in for a DeepSpeed engine: one tensor, saved like save_checkpoint lays it out."""

    def __init__(self, value=0.0, fail=False):
        self.w = torch.tensor([value])
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        if self.fail:
            raise KeyboardInterrupt("killed during save")
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.w, Path(save_dir, tag, "w.pt"))

    def load_checkpoint(self, load_dir, tag, **kw):
        f = Path(load_dir, tag, "w.pt")
        if not f.is_file():
            return None, None
        self.w = torch.load(f)
        return load_dir, {}


class Engines(dict):
    pass


def test_save_load_keep_and_rng(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for step in (2, 4, 6):
        mgr.save(step, Engines(generator=FakeEngine(step)), {"step": step})
    assert [p.name for p in mgr.complete()] == ["step_00000004", "step_00000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    torch.manual_seed(123)
    random.seed(5)
    mgr.save(8, Engines(generator=FakeEngine(8)), {"step": 8})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    eng = FakeEngine()
    state = mgr.load(mgr.latest(), Engines(generator=eng))
    assert state["step"] == 8 and eng.w.item() == 8
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(4, Engines(generator=FakeEngine(4)), {"step": 4})
    with pytest.raises(KeyboardInterrupt):
        mgr.save(8, Engines(generator=FakeEngine(0.0), fake_score=FakeEngine(fail=True)), {"step": 8})
    # the half-written save is not a checkpoint, and the previous one survived keep=1
    assert mgr.latest().name == "step_00000004"
    assert (tmp_path / "checkpoints" / "step_00000008.partial").exists()
    eng = FakeEngine()
    assert mgr.load(mgr.latest(), Engines(generator=eng))["step"] == 4 and eng.w.item() == 4
    # the next save at that step cleans the leftover
    mgr.save(8, Engines(generator=FakeEngine(8)), {"step": 8})
    assert not (tmp_path / "checkpoints" / "step_00000008.partial").exists()
    assert [p.name for p in mgr.complete()] == ["step_00000008"]


def test_missing_engine_state_is_an_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, Engines(generator=FakeEngine(2)), {"step": 2})
    with pytest.raises(FileNotFoundError, match="discriminator"):
        mgr.load(mgr.latest(), Engines(generator=FakeEngine(), discriminator=FakeEngine()))
