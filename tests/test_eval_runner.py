"""The evaluator end to end on tiny generators: table, same seeds across models, resume, n/a columns."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
from eval_fixtures.standins import average_interpolator, phase_correlation_flow

from mogan_ds.data.video import read_mp4
from mogan_ds.eval.dynamic_degree import DynamicDegree
from mogan_ds.eval.metrics import VideoMetrics
from mogan_ds.eval.motion_smoothness import MotionSmoothness
from mogan_ds.eval.runner import ModelSpec, evaluate, parse_model
from mogan_ds.eval.weights import NOT_GIVEN

SMALL = ["video.num_frames=5", "video.height=64", "video.width=64", "gan.space=latent", "schedule.teacher_steps=1"]
PROMPTS = "a red ball rolls\na cat jumps\n"


class CountingMetrics(VideoMetrics):
    """The VBench rules on deterministic stand-ins, counting the videos it scores."""

    def __init__(self):
        super().__init__(
            dynamic=DynamicDegree(phase_correlation_flow),
            smoothness=MotionSmoothness(average_interpolator),
            weights={
                "dynamics_degree": "stand-in",
                "motion_smoothness": "stand-in",
                "motion_score": "stand-in",
                "aesthetic_quality": NOT_GIVEN,
                "imaging_quality": NOT_GIVEN,
            },
        )
        self.calls = 0

    def video(self, frames, fps):
        self.calls += 1
        return super().video(frames, fps)


@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text(PROMPTS)
    kwargs = dict(
        models=[
            ModelSpec("dmd", str(tiny_models / "generator")),
            ModelSpec("teacher", teacher=True),
        ],
        prompts=root / "prompts.txt",
        seeds=[0, 1],
        config="tiny",
        overrides=[*SMALL, f"models.root={tiny_models / 'wan'}"],
        progress=False,
    )
    metrics = CountingMetrics()
    rows = evaluate(out=root / "out", metrics=metrics, **kwargs)
    return root, rows, metrics, kwargs


def test_table_for_two_generators(evaluated):
    root, rows, metrics, _ = evaluated
    out = root / "out"
    assert metrics.calls == 8  # 2 models x 2 prompts x 2 seeds
    assert [r["model"] for r in rows] == ["dmd", "teacher"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    for r in rows:
        assert r["num_videos"] == 4
        assert 0 <= r["motion_smoothness"] <= 1 and r["dynamics_degree"] in (0, 0.25, 0.5, 0.75, 1)
        assert r["motion_score"] == pytest.approx((r["motion_smoothness"] + r["dynamics_degree"]) / 2)
        assert r["aesthetic_quality"] is None and r["imaging_quality"] is None
        assert r["weights"]["aesthetic_quality"] == NOT_GIVEN
    assert rows[1]["sampler"] == "teacher CFG, 1 steps"
    md = (out / "results.md").read_text()
    assert "| Model | Videos | Smoothness (%) | Dynamics | Motion Score | Aesthetic | Image Quality |" in md
    assert "| dmd | 4 |" in md and "| teacher | 4 |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["seed"] for r in records} == {0, 1}


def test_same_seeds_give_every_model_the_same_noise(evaluated, tiny_models, tmp_path):
    root, _, _, kwargs = evaluated
    # The generator folder and the teacher's transformer hold the same tiny weights: as two
    # few-step "models" they must render identical videos from identical seeds.
    same = dict(
        kwargs,
        models=[
            ModelSpec("a", str(tiny_models / "generator")),
            ModelSpec("b", str(tiny_models / "wan" / "transformer")),
        ],
        seeds=[3],
    )
    rows = evaluate(out=tmp_path / "o", metrics=CountingMetrics(), **same)
    for name in ("0000_a_red_ball_rolls.mp4", "0001_a_cat_jumps.mp4"):
        fa, _ = read_mp4(tmp_path / "o/videos/a/seed3" / name)
        fb, _ = read_mp4(tmp_path / "o/videos/b/seed3" / name)
        np.testing.assert_array_equal(fa, fb)
    assert {k: v for k, v in rows[0].items() if k not in ("model", "generator")} == {
        k: v for k, v in rows[1].items() if k not in ("model", "generator")
    }
    # ... and a different seed gives a different video.
    f0, _ = read_mp4(root / "out/videos/dmd/seed0/0000_a_red_ball_rolls.mp4")
    f1, _ = read_mp4(root / "out/videos/dmd/seed1/0000_a_red_ball_rolls.mp4")
    assert not np.array_equal(f0, f1)


def test_resume_reuses_finished_videos_and_scores(evaluated, tmp_path):
    root, rows, _, kwargs = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # An interrupted run: one video never written, the last metrics record cut mid-line.
    lost = out / "videos/teacher/seed1/0001_a_cat_jumps.mp4"
    lost.unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    (out / "results.json").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    metrics = CountingMetrics()
    again = evaluate(out=out, metrics=metrics, **kwargs)
    assert lost.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing else re-sampled
    assert metrics.calls == 1  # only the re-sampled video (its record was the cut one) is scored
    assert again == rows


def test_model_name_reused_for_other_weights_is_refused(evaluated, tiny_models):
    root, _, _, kwargs = evaluated
    other = dict(kwargs, models=[ModelSpec("dmd", str(tiny_models / "wan" / "transformer"))])
    with pytest.raises(Exception, match="use another model name"):
        evaluate(out=root / "out", metrics=CountingMetrics(), **other)
    assert parse_model("x=/a/b") == ModelSpec("x", "/a/b") and parse_model("/a/run1/").name == "run1"


def _cli(repo_root):
    spec = importlib.util.spec_from_file_location("evaluate_cli", f"{repo_root}/launch/evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_missing_weights_give_na_and_a_message(evaluated, tmp_path, repo_root, capsys):
    root, _, _, kwargs = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)  # videos cached: the CLI only scores
    (out / "metrics.jsonl").unlink()
    main = _cli(repo_root)
    args = [
        "--config",
        "tiny",
        "--prompts",
        str(kwargs["prompts"]),
        "--model",
        f"dmd={kwargs['models'][0].path}",
        "--teacher",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        "--amt",
        str(tmp_path / "missing-amt-s.pth"),
        "--no-progress",
        *kwargs["overrides"],
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "missing-amt-s.pth: no such file or folder" in printed
    assert "--raft" in printed and NOT_GIVEN in printed
    rows = json.loads((out / "results.json").read_text())
    assert all(r[c] is None for r in rows for c in ("motion_smoothness", "dynamics_degree", "motion_score"))
    assert "| dmd | 4 | n/a | n/a | n/a | n/a | n/a |" in (out / "results.md").read_text()
    # A bad input is one stderr line and exit code 2.
    args[3] = str(tmp_path / "none.txt")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.txt" in err and err.startswith("evaluate.py: error:")


@pytest.mark.slow
def test_two_ranks_split_the_videos_and_rank0_writes_the_table(tiny_models, tmp_path):
    """Under the deepspeed launcher the videos are split across ranks and rank 0 gathers them."""
    import subprocess

    from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env

    (tmp_path / "prompts.txt").write_text(PROMPTS + "a dog runs\n")
    out = tmp_path / "out"
    args = ["--config", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--model",
            f"dmd={tiny_models / 'generator'}", "--seeds", "0", "1", "--out", str(out), "--no-progress",
            *SMALL, f"models.root={tiny_models / 'wan'}"]  # fmt: skip
    proc = subprocess.run(deepspeed_command(2, REPO / "launch" / "evaluate.py", args), cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [len((out / f"metrics.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert per_rank == [3, 3]  # 3 prompts x 2 seeds, half each
    (row,) = json.loads((out / "results.json").read_text())
    assert row["model"] == "dmd" and row["num_videos"] == 6
    assert len(list((out / "videos" / "dmd").glob("seed*/*.mp4"))) == 6
