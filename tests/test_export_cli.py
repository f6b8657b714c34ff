"""`python -m mogan_ds export`: a checkpoint on disk -> WanPipeline folder, offline, equal to the
trainer's own export; bad input is one line. (The trainer's export of a non-final step and of
the raw weights is compared in tests/test_reshape_resume.py, where a trainer is resumed.)"""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from scale_runs import reference_run

from mogan_ds.cli.launcher import REPO, launch_env

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def export(*args):
    return subprocess.run(
        [sys.executable, "-m", "mogan_ds", "export", *map(str, args)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run(tiny_workdir, tmp_path_factory):
    return reference_run(tiny_workdir, tmp_path_factory)


@pytest.mark.slow
def test_cli_ema_export_equals_the_trainers_export(run, tmp_path):
    out = tmp_path / "ema"
    proc = export("--run-dir", run, "--step", 2, "--ema", "--critics", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The trainer exported the EMA at its last step (2): same bytes, same config.
    assert (out / TRANSFORMER).read_bytes() == (run / "export" / TRANSFORMER).read_bytes()
    assert (out / "transformer/config.json").read_text() == (run / "export/transformer/config.json").read_text()
    for sub in ("vae", "text_encoder", "scheduler"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(p.name for p in (run / "export" / sub).iterdir())

    # The critics as plain state dicts: every parameter of the discriminator and fake score.
    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict

    ckpt = run / "checkpoints" / "step_00000002"
    for role in ("fake_score", "discriminator"):
        written = load_file(out / "critics" / f"{role}.safetensors")
        ref = engine_fp32_state_dict(ckpt, role)
        assert written.keys() == ref.keys() and len(ref) > 10
        assert all(torch.equal(written[k], ref[k]) for k in ref)

    # The raw weights differ from their EMA after two steps at decay 0.9 (so --ema is not a no-op).
    raw = tmp_path / "raw"
    from mogan_ds.__main__ import main

    assert main(["export", "--run-dir", str(run), "--out", str(raw)]) == 0  # default: the newest checkpoint (2)
    a, b = load_file(raw / TRANSFORMER), load_file(out / TRANSFORMER)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def one_line_error(capsys, *args) -> str:
    from mogan_ds.__main__ import main

    assert main(["export", *map(str, args)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_run_dir_is_one_line(tmp_path, capsys):
    assert "no such directory" in one_line_error(capsys, "--run-dir", tmp_path / "nope", "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint" in one_line_error(capsys, "--run-dir", tmp_path / "empty", "--out", tmp_path / "o")


@pytest.mark.slow
def test_bad_step_out_or_incomplete_checkpoint_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert "--step 9: no checkpoint of that step" in one_line_error(capsys, "--run-dir", run, "--step", 9, "--out", out)
    assert "would delete the run directory" in one_line_error(capsys, "--run-dir", run, "--out", run)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("export", "step_00000002"))
    (broken / "checkpoints" / "step_00000001" / "COMPLETE").unlink()
    assert "incomplete checkpoint" in one_line_error(capsys, "--run-dir", broken, "--step", 1, "--out", out)
    # the same checkpoint without its EMA shards' trainer files cannot give --ema
    (broken / "checkpoints" / "step_00000001" / "COMPLETE").write_text("1\n")
    (broken / "checkpoints" / "step_00000001" / "trainer" / "rank_00001.pt").unlink()
    assert "rank files for layout" in one_line_error(capsys, "--run-dir", broken, "--ema", "--out", out)
    assert not out.exists()
