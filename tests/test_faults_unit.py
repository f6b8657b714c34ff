"""Fault handling without a launcher: shards that fail to open or read are retried, then skipped and
counted; exit signals become one agreed flag; a rank notices that its DeepSpeed launcher is gone."""

import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter

import pytest
from conftest import clip_stream
from webdataset.tariterators import gopen as wds_gopen  # the module url_opener calls

from mogan_ds.data.shard_build import write_tar_atomic
from mogan_ds.data.streaming import Slot, resumable_samples, shard_samples


def write_shard(path, n, tag):
    samples = [{"__key__": f"{tag}{j:03d}", "json": b"{}", "txt": f"{tag} {j}".encode() * 9000} for j in range(n)]
    write_tar_atomic(str(path), samples)
    return str(path)


class Flaky:
    """webdataset's gopen for one url: fails as scripted ('open' or 'read'), then opens normally."""

    def __init__(self, url, script, code=errno.EIO):
        self.url, self.script, self.code, self.opens = url, list(script), code, 0
        self.real = wds_gopen.gopen

    def __call__(self, url, *args, **kwargs):
        if url != self.url:
            return self.real(url, *args, **kwargs)
        self.opens += 1
        what = self.script.pop(0) if self.script else None
        if what == "open":
            raise OSError(self.code, os.strerror(self.code), url)
        stream = self.real(url, *args, **kwargs)
        if what == "read":  # fails in the middle of the shard, after a sample's first member was read
            data = stream.read()
            stream.close()
            code = self.code
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                cut = next(m.offset_data for m in tar.getmembers() if m.name.endswith("005.txt")) + 30000

            class Broken(io.RawIOBase):
                pos = 0

                def readable(self):
                    return True

                def readinto(self, b):
                    if self.pos >= cut:
                        raise OSError(code, os.strerror(code))
                    n = min(len(b), cut - self.pos)
                    b[:n] = data[self.pos : self.pos + n]
                    self.pos += n
                    return n

            return io.BufferedReader(Broken())
        return stream


def test_a_shard_that_fails_to_open_and_then_mid_read_is_reread_once_whole(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "a.tar", 10, "a")
    flaky = Flaky(url, ["open", "read"])
    monkeypatch.setattr(wds_gopen, "gopen", flaky)
    stats = Counter()
    got = list(shard_samples(url, 0, stats, retries=3, wait=0.01))
    assert [j for j, _ in got] == list(range(10))  # every sample once, in order
    assert [s["__key__"] for _, s in got] == [f"a{j:03d}" for j in range(10)]
    # none cut short by the broken read: the sample it broke in is read again, whole
    assert all(s.get("txt") == f"a {j}".encode() * 9000 and s.get("json") == b"{}" for j, s in got)
    assert flaky.opens == 3 and stats["shard_retries"] == 2 and stats["shard_errors"] == 0
    # resuming inside the shard (start=4) re-reads from there, retries included
    flaky = Flaky(url, ["read"])
    monkeypatch.setattr(wds_gopen, "gopen", flaky)
    assert [j for j, _ in shard_samples(url, 4, Counter(), retries=1, wait=0.01)] == list(range(4, 10))


def test_a_vanished_shard_is_retried_then_skipped_and_counted(tmp_path, caplog):
    a, b = write_shard(tmp_path / "a.tar", 4, "a"), write_shard(tmp_path / "b.tar", 4, "b")
    stats = Counter()
    stream = resumable_samples(
        Slot([a, b], 1, 0, [0, 0]), (1, 0, 0, 7), [0, 0, 0, 0], 2, stats, retries=2, retry_wait=0.01
    )
    first = [next(stream)["__key__"] for _ in range(2)]
    os.remove(a)  # gone mid-run (a network filesystem's hiccup that did not heal)
    caplog.set_level("WARNING", logger="mogan_ds.data")
    later = [next(stream)["__key__"] for _ in range(12)]
    assert all(k.startswith("b") for k in later[-8:])  # the stream goes on with the shard it can read
    assert stats["shard_errors"] >= 1 and stats["shard_retries"] == 2 * stats["shard_errors"]
    assert "a.tar" in caplog.text and "retry 2 of 2" in caplog.text and "skipping" in caplog.text
    assert first  # (read before the deletion)


def test_corrupt_tar_content_is_not_retried(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is no tar" * 100)
    stats = Counter()
    assert list(shard_samples(str(bad), 0, stats, retries=3, wait=0.01)) == []
    assert stats["shard_retries"] == 0 and stats["shard_errors"] == 1


# ---------------------------------------------------------------------------- exit signals
def test_a_signal_is_a_flag_and_a_second_one_changes_nothing():
    from mogan_ds.train.preemption import StopRequest

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(["SIGTERM", "SIGUSR1"], watch_launcher=False)
    with stop.active():
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # during the save: only counted
        time.sleep(0.05)
        assert stop.agreed() == "SIGUSR1" and stop.count == 2
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored after the block


def test_forked_children_do_not_die_of_the_exit_signals_but_of_their_parents_sigterm():
    from mogan_ds.train.preemption import StopRequest

    with StopRequest(["SIGTERM", "SIGUSR1"], watch_launcher=False).active():
        pid = os.fork()
        if pid == 0:  # a loader worker: must not die of the signals Slurm sends every process
            ok = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
            ok = ok and signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            time.sleep(0.5 if ok else 0)
            os._exit(0 if ok else 1)
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's is back
        subprocess.run(["kill", "-TERM", str(pid)], check=True)  # from someone else: ignored
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(1)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)  # from the parent: ends it at once, quietly
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")
@pytest.mark.parametrize("kill", ["deepspeed", "launch"])
def test_a_rank_notices_that_its_launcher_is_gone(tmp_path, kill):
    """deepspeed (the command the user started) -> deepspeed.launcher.launch -> rank, as stand-ins:
    killing either launcher leaves the rank with a stop reason naming it."""
    report = tmp_path / "report.txt"
    rank = textwrap.dedent(f"""
        import time, signal
        from mogan_ds.train.preemption import StopRequest
        stop = StopRequest(["SIGTERM"]).install()
        open({str(report)!r} + ".ready", "w").write(str(stop.watch.active))
        for _ in range(600):
            reason = stop.local_reason()
            if reason:
                break
            time.sleep(0.05)
        open({str(report)!r}, "w").write(str(reason))
    """)
    # a node launcher whose command line names deepspeed's module, as the real one's does
    launch = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}]) # deepspeed.launcher.launch"
    runner = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {launch!r}]); time.sleep(600)"
    import psutil

    top = subprocess.Popen([sys.executable, "-c", runner], env={**os.environ, "PYTHONPATH": os.getcwd()})
    family = []
    try:
        deadline = time.time() + 120
        while not (tmp_path / "report.txt.ready").exists() and time.time() < deadline:
            time.sleep(0.1)
        family = psutil.Process(top.pid).children(recursive=True)
        assert (tmp_path / "report.txt.ready").read_text() == "True"  # watching: the parent is the node launcher
        node = next(p for p in family if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        (node if kill == "launch" else psutil.Process(top.pid)).kill()
        while not report.exists() and time.time() < deadline:
            time.sleep(0.1)
        text = report.read_text()
        if kill == "launch":  # the kernel's parent-death signal, or the watch: either names it
            assert text in ("SIGTERM", f"the DeepSpeed launcher (pid {node.pid}) exited"), text
        else:
            assert text == f"the deepspeed command (pid {top.pid}) that started this job exited", text
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        top.kill()
        top.wait()


# ---------------------------------------------------------------------------- the Slurm script
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
@pytest.mark.parametrize(
    ("rc", "note", "requeued"), [(75, False, True), (137, True, True), (74, False, False), (0, False, False)]
)
def test_slurm_script_requeues_a_stopped_run_and_shields_the_launchers(tmp_path, repo_root, rc, note, requeued):
    """launch/slurm.sbatch with stand-ins for srun, scontrol and the deepspeed launcher: it asks for
    the warning signal, the launcher starts with SIGTERM and SIGUSR1 ignored, and exit code 75 (or
    the trainer's STOPPED note, when srun reports a task it killed) requeues the job."""
    script = open(os.path.join(repo_root, "launch", "slurm.sbatch")).read()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    bin_dir, env_dir, run_dir = tmp_path / "bin", tmp_path / "venv", tmp_path / "run"
    (env_dir / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"

    def stub(path, body):
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)

    stub(bin_dir / "scontrol", f'if [ "$1" = show ]; then echo node0; else echo "scontrol $*" >> {calls}; fi')
    # srun: run the task command once, as node 0
    stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=0 exec "$@"')
    stopped = f'echo "stopping at step 3 on SIGUSR1" > "{run_dir}/STOPPED"; ' if note else ""
    stub(env_dir / "bin" / "deepspeed", f"grep SigIgn /proc/self/status > {tmp_path}/sigign.txt; {stopped}exit {rc}")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": repo_root,
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "8",
        "RUN_DIR": str(run_dir),
        "PYTHON_ENV": str(env_dir),
    }
    out = subprocess.run(
        ["bash", os.path.join(repo_root, "launch", "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    mask = int((tmp_path / "sigign.txt").read_text().split()[1], 16)
    assert mask & (1 << (signal.SIGUSR1 - 1)) and mask & (1 << (signal.SIGTERM - 1))  # inherited by the launcher
    assert (calls.read_text() if calls.exists() else "") == ("scontrol requeue 4242\n" if requeued else "")
    assert out.returncode == (0 if requeued else rc), out.stdout + out.stderr
    if requeued:
        assert "requeueing" in out.stdout


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="sigwaitinfo")
def test_loader_workers_outlast_the_clusters_signals_but_not_their_rank(tmp_path):
    """A loader worker ignores SIGTERM/SIGUSR1 from anyone but its rank (Slurm signals every process
    of the step; a dead worker would end the rank before it saves), and still ends when its rank
    shuts it down."""
    import psutil
    import torch

    from mogan_ds.data.synthetic import write_synthetic_corpus
    from mogan_ds.train.preemption import StopRequest

    write_synthetic_corpus(
        str(tmp_path / "shards"), num_clips=4, frames=12, size=(64, 64), shards=2, echo=lambda *a: None
    )
    stream = clip_stream(
        str(tmp_path / "shards"),
        num_workers=1,
        batch_size=1,
        shuffle_buffer=1,
        epoch_samples=100,
        output_dtype=torch.uint8,
    )
    # Earlier tests of the session may have left children of this process: the worker is the new one.
    before = {p.pid for p in psutil.Process().children()}
    with StopRequest(["SIGTERM", "SIGUSR1"], watch_launcher=False).active() as stop:
        batches = iter(stream)
        next(batches)
        (worker,) = [p for p in psutil.Process().children() if p.pid not in before]
        for sig in ("TERM", "USR1"):  # as Slurm sends them: from another process
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
        time.sleep(0.5)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        assert next(batches)["video"].shape[0] == 1  # and it goes on loading
        assert stop.received is None  # the rank itself was not signalled
        batches.close()  # the rank's shutdown: the loader's own SIGTERM/exit request ends it
        worker.wait(timeout=30)
