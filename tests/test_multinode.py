"""Two "nodes" on one machine: two `deepspeed --no_ssh --node_rank {0,1}` launchers (one CPU rank
each, a hostfile naming this host twice) train the tiny recipe and equal the same run as 2 ranks
on one node. And the timeout: a rank that stops answering ends the other one within
parallel.timeout_minutes with a one-line error."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from scale_runs import COMPARED, STEPS, check, reference_run, train_args

from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env
from mogan_ds.parallel.ranks import free_port
from mogan_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_two_nodes_equal_one_node(tiny_workdir, tmp_path_factory, tmp_path):
    reference = reference_run(tiny_workdir, tmp_path_factory)
    # Two entries for this host: with --no_ssh the names are never contacted, each launcher
    # starts only its own node's slots and finds rank 0 at --master_addr.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run, port = tmp_path / "run", free_port()
    exe = deepspeed_command(1, "x", [])[0]
    procs = [
        subprocess.Popen(
            [
                exe,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--num_nodes",
                "2",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(REPO / "launch" / "train.py"),
                *train_args(tiny_workdir, run),
            ],
            cwd=REPO,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for p in procs:
        out, err = p.communicate(timeout=1200)
        check(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    # Same ranks, same groups, same collectives in the same order: the two-node run is the
    # one-node run bit for bit (only the rendezvous differs).
    ours, ref = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        for k in COMPARED:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict

    last = f"checkpoints/step_{STEPS:08d}"
    for role in ("generator", "discriminator"):
        x, y = engine_fp32_state_dict(run / last, role), engine_fp32_state_dict(reference / last, role)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), role


def test_a_hung_rank_ends_the_other_within_the_timeout(tiny_workdir, tmp_path):
    # Long enough for the two ranks' start-up skew on a loaded 2-core machine (they meet in
    # collectives while building the engines), short enough for a test.
    timeout_s = 30
    run, port = tmp_path / "run", free_port()
    # The ranks are started as the launcher would (same environment variables) but without
    # it: DeepSpeed's launcher kills the survivors when one rank exits, which would hide
    # whether the survivor ends by itself.
    args = train_args(
        tiny_workdir,
        run,
        50,
        "gan.enabled=false",
        f"parallel.timeout_minutes={timeout_s / 60}",
        "output.checkpoint_every=1000",
    )
    procs = []
    for rank in (0, 1):
        env = launch_env(
            {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        )
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "launch" / "train.py"), *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        metrics, deadline = run / "metrics.jsonl", time.time() + 600
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        assert metrics.is_file(), "no step finished"
        assert json.loads(metrics.read_text().splitlines()[0])["step"] == 1
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 hangs: alive, sockets open, silent
        stopped = time.time()
        err = procs[0].communicate(timeout=timeout_s + 120)[1]
        waited = time.time() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    # The collective the survivor was in, or the next one (ZeRO-3 gathers parameters in
    # every forward), raised after the timeout: not before it, and not much after.
    # (It may have been waiting on rank 1 already for part of a step when the stop came.)
    assert timeout_s / 2 <= waited <= timeout_s + 60, waited
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error: rank 0:")]
    assert len(lines) == 1 and "parallel.timeout_minutes=0.5" in lines[0], err[-3000:]
    assert "--resume" in lines[0]
