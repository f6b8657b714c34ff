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


# ---------------------------------------------------------------------------- storage faults
class PlainCheckpointEngine:
    """DeepSpeed's TorchCheckpointEngine in miniature: save/load by path."""

    zipfile_serialization = True

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def makedirs(self, path, exist_ok=False):
        Path(path).mkdir(parents=True, exist_ok=exist_ok)


class DeepSpeedLikeEngine(FakeEngine):
    """Writes and reads its files through `checkpoint_engine`, as DeepSpeed's engine does."""

    def __init__(self, value=0.0, size=1000):
        super().__init__(value)
        self.w = torch.full((size,), float(value))
        self.checkpoint_engine = PlainCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        self.checkpoint_engine.makedirs(Path(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": self.w}, str(Path(save_dir, tag, "model_states.pt")))
        self.checkpoint_engine.save({"adam": self.w * 2}, str(Path(save_dir, tag, "optim_states.pt")))

    def load_checkpoint(self, load_dir, tag, **kw):
        f = Path(load_dir, tag, "model_states.pt")
        if not f.is_file():
            return None, None
        self.w = self.checkpoint_engine.load(str(f))["w"]
        self.checkpoint_engine.load(str(Path(load_dir, tag, "optim_states.pt")))
        return load_dir, {}


def engines(value, size=1000):
    return Engines(generator=DeepSpeedLikeEngine(value, size), fake_score=DeepSpeedLikeEngine(-value, size))


def test_manifest_records_size_and_crc_of_every_file(tmp_path):
    from mogan_ds.checkpoint.integrity import crc32_file, read_manifest

    mgr = CheckpointManager(tmp_path)
    path = mgr.save(2, engines(2.0), {"step": 2})
    manifest = read_manifest(path)
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(manifest["files"]) == on_disk and "generator/state/optim_states.pt" in on_disk
    for rel, (size, crc) in manifest["files"].items():
        assert [size, crc] == list(crc32_file(path / rel)), rel
    assert manifest["bytes"] == sum(s for s, _ in manifest["files"].values()) and manifest["step"] == 2
    assert mgr.verify(path, checksums=True) == []
    assert "free of" in mgr.summary(path)


def damage(path, truncate=None, flip=None):
    if truncate:
        f = path / truncate
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    if flip:
        f = path / flip
        data = bytearray(f.read_bytes())
        for i in (len(data) // 2, len(data) // 2 + 7, len(data) // 2 + 64):  # inside the tensor data
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))


def test_sizes_find_truncation_checksums_find_flipped_bytes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(2, engines(2.0), {"step": 2})
    damage(path, flip="generator/state/optim_states.pt")
    assert mgr.verify(path) == []  # same size: only the content changed
    (problem,) = mgr.verify(path, checksums=True)
    assert problem.startswith("generator/state/optim_states.pt: CRC-32") and "damaged" in problem
    # ...and torch's zip reader loads the damaged file without complaint: only the CRC tells
    torch.load(path / "generator/state/optim_states.pt", weights_only=False)
    damage(path, truncate="fake_score/state/optim_states.pt")
    problems = mgr.verify(path)
    assert len(problems) == 1 and "fake_score/state/optim_states.pt" in problems[0] and "truncated" in problems[0]
    (path / "trainer" / "rank_00000.pt").unlink()
    assert any("trainer/rank_00000.pt: missing" in p for p in mgr.verify(path))


def test_resume_skips_a_damaged_checkpoint_and_never_names_it_again(tmp_path, caplog):
    from mogan_ds.checkpoint.manager import NoIntactCheckpointError

    mgr = CheckpointManager(tmp_path, keep=3)
    for step in (2, 4):
        mgr.save(step, engines(float(step)), {"step": step})
    newest = tmp_path / "checkpoints" / "step_00000004"
    damage(newest, truncate="generator/state/optim_states.pt", flip="fake_score/state/optim_states.pt")
    with caplog.at_level("WARNING", logger="mogan_ds"):
        chosen = mgr.choose_resume(checksums=True)
    assert chosen.name == "step_00000002"
    (line,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "step_00000004 is damaged: fake_score/state/optim_states.pt: CRC-32" in line
    assert "(and 1 more, listed in step_00000004/DAMAGED)" in line and "resuming from step_00000002" in line
    # marked: nothing (latest(), the `latest` pointer, a later --resume) points at it again
    listed = (newest / "DAMAGED").read_text()
    assert "generator/state/optim_states.pt" in listed and "truncated" in listed and "CRC-32" in listed
    assert mgr.latest().name == "step_00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    eng = engines(0.0)
    assert mgr.load(chosen, eng)["step"] == 2 and eng["generator"].w[0].item() == 2.0
    # the run reaches step 4 again: the damaged folder is replaced by a good one
    mgr.save(4, engines(4.0), {"step": 4})
    assert mgr.latest().name == "step_00000004" and mgr.verify(newest, checksums=True) == []
    # none intact: refused, naming the damaged files
    damage(newest, truncate="generator/state/model_states.pt")
    damage(tmp_path / "checkpoints" / "step_00000002", truncate="trainer/rank_00000.pt")
    with pytest.raises(NoIntactCheckpointError, match="trainer/rank_00000.pt") as err:
        mgr.choose_resume()
    assert "generator/state/model_states.pt" in str(err.value)


def test_a_file_that_fails_to_load_is_named_and_its_checkpoint_marked(tmp_path):
    from mogan_ds.checkpoint.storage import CheckpointReadError

    mgr = CheckpointManager(tmp_path)
    for step in (2, 4):
        mgr.save(step, engines(float(step)), {"step": step})
    newest = mgr.latest()
    bad = newest / "fake_score" / "state" / "optim_states.pt"
    bad.write_bytes(bad.read_bytes()[:100])  # sizes unchecked here: the load itself fails
    with pytest.raises(CheckpointReadError) as err:
        mgr.load(newest, engines(0.0))
    assert str(bad) in str(err.value)
    final = mgr.unloadable(newest, err.value)
    assert str(bad) in str(final) and "continues from step_00000002" in str(final)
    assert "--resume" in str(final) and "from step_00000004" not in str(final)
    assert mgr.latest().name == "step_00000002"


class FullDisk:
    """`open` for mogan_ds.checkpoint.storage whose files stop taking bytes past `room`."""

    def __init__(self, room, code=28):
        self.room, self.code, self.used = room, code, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        import builtins
        import os

        f = builtins.open(path, mode, *args, **kwargs)
        disk = self

        class Limited:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                n = memoryview(data).nbytes
                if disk.used + n > disk.room:
                    raise OSError(disk.code, os.strerror(disk.code))
                disk.used += n
                return f.write(data)

        return Limited()


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    from mogan_ds.checkpoint import storage
    from mogan_ds.checkpoint.storage import CheckpointWriteError

    mgr = CheckpointManager(tmp_path, keep=1)
    first = mgr.save(2, engines(2.0, size=20000), {"step": 2})
    monkeypatch.setattr(storage, "open", FullDisk(room=100_000), raising=False)
    with pytest.raises(CheckpointWriteError) as err:
        mgr.save(4, engines(4.0, size=20000), {"step": 4})
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device (ENOSPC)" in msg and "inline_container" not in msg
    assert "checkpoints/step_00000004.partial/" in msg and ".pt" in msg  # the file it failed on
    assert "free of" in msg and f"the previous checkpoint {first} is intact" in msg
    # nothing of the failed save is left; keep=1 did not delete the last complete one
    assert not (tmp_path / "checkpoints" / "step_00000004.partial").exists()
    assert [p.name for p in mgr.complete()] == ["step_00000002"] and mgr.verify(first, checksums=True) == []
    monkeypatch.undo()
    eng = engines(0.0, size=20000)
    assert mgr.load(mgr.choose_resume(checksums=True), eng)["step"] == 2 and eng["generator"].w[0].item() == 2.0


@pytest.mark.parametrize("code", [5, 13])  # EIO, EACCES: named in the system's words too
def test_other_write_errors_are_named(tmp_path, monkeypatch, code):
    import os

    from mogan_ds.checkpoint import storage
    from mogan_ds.checkpoint.storage import CheckpointWriteError

    mgr = CheckpointManager(tmp_path)
    monkeypatch.setattr(storage, "open", FullDisk(room=0, code=code), raising=False)
    with pytest.raises(CheckpointWriteError, match=os.strerror(code)) as err:
        mgr.save(2, engines(2.0), {"step": 2})
    assert "no earlier checkpoint exists" in str(err.value) and mgr.latest() is None


def test_torch_save_reports_the_system_error_not_the_zip_writer(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE) on a child process: EFBIG comes back as itself."""
    import subprocess
    import sys

    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "import torch; from mogan_ds.checkpoint.storage import torch_save\n"
        "try:\n"
        f"    torch_save({{'w': torch.zeros(100000)}}, {str(tmp_path / 'big.pt')!r})\n"
        "except OSError as e:\n"
        "    print('OSError', e.errno, e.strerror)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OSError 27 File too large", out.stdout + out.stderr


def test_a_failed_copy_is_named_by_its_destination_and_its_source_is_left_alone(tmp_path):
    """DeepSpeed copies its recovery scripts with shutil.copyfile, outside the checkpoint engine; a
    full disk there raises an OSError whose `filename` is the *source* (DeepSpeed's own file)."""
    import errno

    from mogan_ds.checkpoint.storage import CheckpointWriteError

    source = tmp_path / "site-packages" / "zero_to_fp32.py"
    source.parent.mkdir()
    source.write_text("# DeepSpeed's script\n")

    class CopiesScripts(DeepSpeedLikeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest=False):
            super().save_checkpoint(save_dir, tag, save_latest)
            dst = Path(save_dir, "zero_to_fp32.py")
            raise OSError(errno.ENOSPC, "No space left on device", str(source), None, str(dst))

    mgr = CheckpointManager(tmp_path / "run")
    with pytest.raises(CheckpointWriteError) as err:
        mgr.save(2, Engines(generator=CopiesScripts(2.0)), {"step": 2})
    assert source.read_text() == "# DeepSpeed's script\n"
    assert "step_00000002.partial/generator/zero_to_fp32.py: No space left on device" in str(err.value)
    assert str(source) not in str(err.value)
