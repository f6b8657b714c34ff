"""Preemption and storage faults through the real `deepspeed` launcher (2 CPU ranks, tiny recipe).

* SIGTERM to one rank mid-run: every rank stops at the same iteration boundary, a checkpoint of
  that step is saved (a second signal during the save changes nothing), one line names the
  signal and the step, the job exits 75; resuming it gives the uninterrupted run's losses.
* SIGTERM to the `deepspeed` command: it dies at once without telling the ranks; they notice
  their launcher is gone and stop the same way, so no rank outlives the job.
* A filesystem that fills up during a save: one line (the file, "No space left on device", the
  free space), exit 74, the previous checkpoint intact.
* The newest checkpoint with one truncated and one bit-flipped file: --resume --verify says so in
  one line and continues from the one before, with the uninterrupted run's losses.
* A shard deleted while the run reads: retried, skipped, counted in the metrics; the run finishes.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_train_launch import COMPARED, STEPS, check, launch, train_args, uninterrupted_run

from mogan_ds.checkpoint.integrity import read_manifest
from mogan_ds.checkpoint.manager import CheckpointManager
from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env
from mogan_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow
EXIT_REQUEUE, EXIT_STORAGE = 75, 74  # documented in launch/train.py and docs/checkpoints.md, "Guarantees"
NO_PERIODIC = "output.checkpoint_every=50"  # a checkpoint in these runs is the stop's own


@pytest.fixture(scope="module")
def reference(tiny_workdir, tmp_path_factory):
    return uninterrupted_run(tiny_workdir, tmp_path_factory)


class Job:
    """A 2-rank launch we can signal: the `deepspeed` command, its node launcher and the ranks."""

    def __init__(self, args, tmp_path, name, preexec_fn=None):
        self.stderr_path = tmp_path / f"{name}.stderr.txt"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            deepspeed_command(2, REPO / "launch" / "train.py", args),
            cwd=REPO,
            env=launch_env(),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,  # one process group: cleanup reaches orphans too
            preexec_fn=preexec_fn,
        )

    def ranks(self, timeout=300) -> tuple[psutil.Process, list[psutil.Process]]:
        """(the node launcher, the two ranks), once they exist."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            for node in psutil.Process(self.proc.pid).children():
                ranks = [p for p in node.children() if any("--local_rank" in a for a in p.cmdline())]
                if len(ranks) == 2:
                    return node, sorted(ranks, key=lambda p: "--local_rank=1" in p.cmdline())
            time.sleep(0.2)
        raise AssertionError(f"no two ranks appeared:\n{self.stderr()[-3000:]}")

    def wait_for(self, predicate, what, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.stderr()[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text()

    def close(self):
        if self.proc.poll() is None or _alive_group(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._stderr.close()


def _alive_group(pgid) -> bool:
    return any(p.info["pid"] != os.getpid() and _pgid(p.info["pid"]) == pgid for p in psutil.process_iter(["pid"]))


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def logged_step(run: Path, step: int) -> bool:
    f = run / "metrics.jsonl"
    return f.is_file() and any(json.loads(line)["step"] >= step for line in f.read_text().splitlines() if line)


def stop_lines(run: Path) -> list[str]:
    log = run / "logs" / "rank_00000.log"
    return [line for line in log.read_text().splitlines() if "stopping at step" in line] if log.is_file() else []


def stopped_step(run: Path) -> int:
    (line,) = stop_lines(run)
    return int(line.split("stopping at step ")[1].split()[0])


def last_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run)}  # a resumed run's rows replace the old ones


def assert_same_losses(run: Path, reference: Path, steps) -> None:
    ours, ref = last_rows(run), last_rows(reference)
    for step in steps:
        for k in COMPARED:
            assert ours[step][k] == pytest.approx(ref[step][k], rel=1e-5, abs=1e-7), (step, k)


def test_sigterm_to_one_rank_saves_that_step_and_resumes_to_the_same_losses(reference, tiny_workdir, tmp_path):
    run = tmp_path / "signalled"
    job = Job(train_args(tiny_workdir, run, NO_PERIODIC), tmp_path, "signalled")
    try:
        _, (rank0, rank1) = job.ranks()
        job.wait_for(lambda: logged_step(run, 1), "step 1")
        rank1.send_signal(signal.SIGTERM)
        # more signals while the ranks agree and save (and DeepSpeed's launcher's own SIGTERM
        # to the ranks once the first exits): none of them may cut the save short
        while job.proc.poll() is None:
            time.sleep(0.3)
            for p, sig in ((rank1, signal.SIGTERM), (rank0, signal.SIGUSR1)):
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        assert job.proc.returncode == EXIT_REQUEUE, job.stderr()[-4000:]
    finally:
        job.close()
    step = stopped_step(run)
    assert 1 <= step < STEPS
    (line,) = stop_lines(run)
    assert f"stopping at step {step} on SIGTERM: checkpoint {run}/checkpoints/step_{step:08d}" in line
    assert f"exit code {EXIT_REQUEUE}" in line and "--resume" in line
    assert (run / "STOPPED").read_text().strip() == line.split("mogan_ds: ", 1)[1]
    assert "stopping at step" in job.stderr()  # on the console too
    mgr = CheckpointManager(run)
    assert mgr.latest().name == f"step_{step:08d}" and [p.name for p in mgr.complete()] == [f"step_{step:08d}"]
    assert mgr.verify(mgr.latest(), checksums=True) == []  # complete, every file as written
    assert max(last_rows(run)) == step  # no rank went on past the agreed step

    check(launch(train_args(tiny_workdir, run, NO_PERIODIC, "--resume")))
    assert sorted(last_rows(run)) == list(range(1, STEPS + 1))
    assert_same_losses(run, reference, range(1, STEPS + 1))
    assert not (run / "STOPPED").exists()


def test_sigterm_to_the_deepspeed_command_stops_every_rank_with_a_checkpoint(tiny_workdir, tmp_path):
    run = tmp_path / "orphaned"
    job = Job(train_args(tiny_workdir, run, NO_PERIODIC, "train.max_steps=8"), tmp_path, "orphaned")
    try:
        node, ranks = job.ranks()
        job.wait_for(lambda: logged_step(run, 1), "step 1")
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=30) == -signal.SIGTERM  # DeepSpeed's command dies at once, tells no one
        _, alive = psutil.wait_procs([node, *ranks], timeout=300)
        assert not alive, f"outlived their launcher: {alive}"
    finally:
        job.close()
    step = stopped_step(run)
    assert 1 <= step < 8
    (line,) = stop_lines(run)
    assert f"on the deepspeed command (pid {job.proc.pid}) that started this job exited" in line
    assert f"checkpoint {run}/checkpoints/step_{step:08d}" in line and f"exit code {EXIT_REQUEUE}" in line
    mgr = CheckpointManager(run)
    assert mgr.latest().name == f"step_{step:08d}" and mgr.verify(mgr.latest(), checksums=True) == []
    assert max(last_rows(run)) == step


def _mount_tmpfs(path: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return out.returncode == 0


def test_a_disk_that_fills_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    reference, tiny_workdir, tmp_path
):
    ckpt_bytes = read_manifest(reference / "checkpoints" / "step_00000002")["bytes"]
    small = tmp_path / "small"
    small.mkdir()
    run = small / "run"
    # room for the run's logs and one checkpoint, not for a second one (keep_checkpoints=1
    # still needs the old one until the new one is complete)
    args = train_args(tiny_workdir, run, "output.checkpoint_every=1", "output.keep_checkpoints=1", "train.max_steps=2")
    mounted = _mount_tmpfs(small, int(ckpt_bytes * 1.5) + (3 << 20))
    try:
        if mounted:
            proc = launch(args)
        else:
            # No tmpfs here: a file-size limit (RLIMIT_FSIZE) on the ranks, after a first run
            # has written the step-1 checkpoint without it.
            import resource

            check(launch([*args[:-1], "train.max_steps=1"]))
            biggest = max(size for size, _ in read_manifest(run / "checkpoints" / "step_00000001")["files"].values())

            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (biggest // 2, resource.RLIM_INFINITY))

            proc = subprocess.run(
                deepspeed_command(2, REPO / "launch" / "train.py", [*args, "--resume"]),
                cwd=REPO,
                env=launch_env(),
                capture_output=True,
                text=True,
                timeout=900,
                preexec_fn=limit,
            )
        assert proc.returncode == EXIT_STORAGE, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
        errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1, proc.stderr[-6000:]
        (line,) = errors
        cause = "No space left on device (ENOSPC)" if mounted else "File too large (EFBIG)"
        assert "checkpoint of step 2 not saved: rank " in line and cause in line, line
        assert f"{run}/checkpoints/step_00000002.partial/" in line and "free of" in line
        assert f"the previous checkpoint {run}/checkpoints/step_00000001 is intact" in line
        assert "inline_container" not in proc.stderr and "Traceback" not in proc.stderr
        mgr = CheckpointManager(run)
        assert [p.name for p in mgr.complete()] == ["step_00000001"] and mgr.latest().name == "step_00000001"
        assert not (run / "checkpoints" / "step_00000002.partial").exists()
        assert mgr.verify(mgr.latest(), checksums=True) == []  # every byte as written: resumable
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(reference, tiny_workdir, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("export", "samples"))
    newest = run / "checkpoints" / "step_00000004"
    truncated = newest / "fake_score" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size - 4096])
    flipped = newest / "generator" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(flipped.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):  # a few bytes inside the Adam moments
        data[i] ^= 0x5A
    flipped.write_bytes(bytes(data))

    proc = launch(train_args(tiny_workdir, run, NO_PERIODIC, "train.max_steps=3", "--resume", "--verify"))
    check(proc)
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1, proc.stderr[-4000:]  # one line, on rank 0's console
    (line,) = damaged
    assert "checkpoint step_00000004 is damaged: fake_score/state/zero_pp_rank_0_mp_rank_00_optim_states.pt" in line
    assert "truncated" in line and "(and 1 more" in line and "resuming from step_00000002 instead" in line
    listed = (newest / "DAMAGED").read_text()
    assert "generator/state/zero_pp_rank_1_mp_rank_00_optim_states.pt: CRC-32" in listed
    assert f"resumed from {run}/checkpoints/step_00000002 at step 2" in (run / "logs" / "rank_00000.log").read_text()
    assert_same_losses(run, reference, [3])
    mgr = CheckpointManager(run)
    assert mgr.latest().name == "step_00000003" and "step_00000004" not in (run / "checkpoints" / "latest").read_text()


def test_a_shard_deleted_while_the_run_reads_is_counted_and_the_run_finishes(tiny_workdir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(next(a.split("=", 1)[1] for a in tiny_workdir if a.startswith("data.shards=")), shards)
    run = tmp_path / "shard_gone"
    args = train_args(
        tiny_workdir,
        run,
        NO_PERIODIC,
        f"data.shards={shards}",
        "train.max_steps=4",  # a rank's first 4 clips come from both of its 2 shards (3 clips each)
        "logging.sample_every=0",
        "data.shuffle_buffer=1",  # read clips as they are needed
        "data.shard_retries=2",
        "data.shard_retry_wait=0.1",
    )
    job = Job(args, tmp_path, "shard_gone")
    try:
        summary = run / "logs" / "rank_00000.log"
        job.wait_for(lambda: summary.is_file() and "outputs: " in summary.read_text(), "the set-up")
        # after the start-up check found them, before the loaders (first clip in step 1) read them:
        # one shard of each data-parallel rank (rank 0 reads 000000 and 000002, rank 1 the others)
        (shards / "000000.tar").unlink()
        (shards / "000001.tar").unlink()
        assert job.proc.wait(timeout=900) == 0, job.stderr()[-4000:]
    finally:
        job.close()
    rows = last_rows(run)
    assert sorted(rows) == [1, 2, 3, 4]
    # each rank drew its deleted shard at least once (a new cycle may draw it again): each skip
    # after 2 retries, counted over both ranks
    errors, retries = rows[4]["data_shard_errors"], rows[4]["data_shard_retries"]
    assert errors >= 2 and retries == 2 * errors, rows[4]
    assert rows[4]["data_decoded"] == 8  # and the run read on: 4 clips per rank from the shards left
    for rank, shard in ((0, "000000.tar"), (1, "000001.tar")):
        logs = (run / "logs" / f"rank_0000{rank}.log").read_text()
        assert f"{shard}: FileNotFoundError" in logs and "retry 2 of 2" in logs and "skipping (rest of) shard" in logs
    assert (run / "export").is_dir()
