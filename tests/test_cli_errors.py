"""Every CLI turns an input mistake into one stderr line naming the key or path, exit code 2.

Most cases run the entry points' main functions in-process (fast); two subprocess runs
prove the real entry points' exit codes and the absence of a traceback.
"""

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mogan_ds.__main__ import main as mogan_main
from mogan_ds.cli.errors import user_errors
from mogan_ds.config import ConfigError
from mogan_ds.errors import BadFileError
from mogan_ds.models.builders import MissingWeightsError
from mogan_ds.sampling.generate import load_prompt_embeds, read_prompt_file, resolve_generator_folder

REPO = Path(__file__).resolve().parents[1]


def _script_main(name):
    # The scripts are thin CLIs; their main() is what the tests exercise (no library code lives there).
    return runpy.run_path(str(REPO / "launch" / name), run_name="mogan_test_" + name.replace(".", "_"))["main"]


def assert_one_line_error(capsys, code, *fragments):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- python -m mogan_ds info


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("gan: {window: [1\n")
    (tmp_path / "list.yaml").write_text("- gan\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    broken = tmp_path / "broken_wan"
    for part in ("transformer", "vae", "text_encoder"):
        (broken / part).mkdir(parents=True)
        (broken / part / "config.json").write_text("{}")
    (broken / "transformer" / "config.json").write_text('{"num_layers": ')
    return tmp_path


INFO_CASES = [
    # (extra argv after `info`, fragments the one stderr line must hold)
    (["--config", "tiny", "models.arch=foo"], ["models.arch", "'foo'"]),
    (["--config", "tiny", "text.max_length=-1"], ["text.max_length", ">= 1"]),  # reached torch.zeros before
    (["--config", "tiny", "gan.head_dim=-4"], ["gan.head_dim"]),
    (["--config", "tiny", "train.batch_size=-8"], ["train.batch_size"]),
    (["--config", "tiny", "train.micro_batch_size=-1"], ["train.micro_batch_size"]),
    (["--config", "tiny", "data.shuffle_buffer=-1"], ["data.shuffle_buffer"]),
    (["--config", "tiny", "data.num_workers=-2"], ["data.num_workers"]),
    (["--config", "tiny", "dmd.critic_updates=-1"], ["dmd.critic_updates"]),
    (["--config", "tiny", "optim.generator.warmup_steps=-10"], ["optim.generator.warmup_steps"]),
    (["--config", "tiny", "schedule.teacher_steps=0"], ["schedule.teacher_steps"]),
    (["--config", "tiny", "logging.log_every=0"], ["logging.log_every"]),
    (["--config", "tiny", "logging.num_samples=-1"], ["logging.num_samples"]),
    (["--config", "tiny", "parallel.sp_size=3", "gan.split_over_sp=false"], ["parallel.sp_size", "4 attention heads"]),
    (["--config", "tiny", "gan.disc_blocks=5", "gan.head_blocks=[4]"], ["gan.disc_blocks", "has 4"]),
    (["--config", "tiny", "gan.nope=1"], ["gan.nope"]),
    (["--config", "tiny", "gan.window=two"], ["gan.window"]),
    (["--config", "no_such_recipe"], ["no_such_recipe"]),
    (["--config", "{d}/empty.yaml"], ["{d}/empty.yaml", "empty"]),
    (["--config", "{d}/bad.yaml"], ["{d}/bad.yaml", "not valid YAML"]),
    (["--config", "{d}/list.yaml"], ["{d}/list.yaml", "mapping"]),
    (["--config", "tiny", "--ds_config", "{d}/missing.json"], ["--ds_config", "{d}/missing.json"]),
    (["--config", "tiny", "--ds_config", "{d}/bad.json"], ["--ds_config", "{d}/bad.json", "not valid JSON"]),
    (["--config", "tiny", "--ds_config", "{d}/list.json"], ["--ds_config", "{d}/list.json"]),
    (
        ["--config", "tiny", "models.arch=auto", "models.root={d}/no_weights"],
        ["{d}/no_weights/transformer/config.json"],
    ),
    (["--config", "tiny", "models.root={d}/broken_wan"], ["{d}/broken_wan/transformer/config.json", "not valid JSON"]),
]


@pytest.mark.parametrize("argv, fragments", INFO_CASES, ids=[" ".join(a[1:]) for a, _ in INFO_CASES])
def test_info_bad_input_is_one_line_exit_2(files, capsys, argv, fragments):
    fill = lambda s: s.replace("{d}", str(files))  # noqa: E731
    code = mogan_main(["info", *map(fill, argv)])
    assert_one_line_error(capsys, code, *map(fill, fragments))


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="models.arch"):
        mogan_main(["info", "--debug", "--config", "tiny", "models.arch=foo"])


def test_demo_checks_its_settings_before_building_anything(tmp_path, capsys):
    code = mogan_main(["demo", "--workdir", str(tmp_path / "w"), "logging.log_every=0"])
    assert_one_line_error(capsys, code, "logging.log_every")
    assert not (tmp_path / "w").exists()


def test_user_errors_only_catches_user_errors(capsys):
    with user_errors(prog="x") as outcome:
        raise FileExistsError("runs/a already holds checkpoints")
    assert outcome.exit_code == 2 and capsys.readouterr().err == "x: error: runs/a already holds checkpoints\n"
    with user_errors(prog="x") as outcome:
        pass
    assert outcome.exit_code == 0
    with pytest.raises(RuntimeError):  # a bug is not an input mistake: it keeps its traceback
        with user_errors(prog="x"):
            raise RuntimeError("boom")
    with user_errors(prog="x") as outcome:  # a multi-line message still prints as one line
        raise ConfigError("a\nb")
    assert capsys.readouterr().err == "x: error: a b\n"


# --------------------------------------------------------------------------- launch/train.py


def test_train_missing_ds_config_is_one_line(tmp_path, capsys):
    train = _script_main("train.py")
    code = train(["--ds_config", str(tmp_path / "nope.json"), "--config", "tiny", f"output.run_dir={tmp_path / 'run'}"])
    assert_one_line_error(capsys, code, "--ds_config", tmp_path / "nope.json")
    code = train(
        ["--ds_config", str(REPO / "ds_configs" / "zero3_cpu.json"), "--config", "tiny", "train.max_nonfinite=0"]
    )
    assert_one_line_error(capsys, code, "train.max_nonfinite")


# --------------------------------------------------------------------------- launch/sample.py


@pytest.fixture
def sample():
    return _script_main("sample.py")


def _sample_args(tmp_path, *extra):
    return ["--config", "tiny", "--out", str(tmp_path / "out"), *extra]


def test_sample_missing_prompts_file(sample, tmp_path, capsys):
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "missing.txt")))
    assert_one_line_error(capsys, code, "--prompts", tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "no prompts"),
        ("# just a comment\n\n", "no prompts"),
    ],
)
def test_sample_empty_prompts_file(sample, tmp_path, capsys, content, fragment):
    (tmp_path / "p.txt").write_text(content)
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "p.txt")))
    assert_one_line_error(capsys, code, tmp_path / "p.txt", fragment)


def test_sample_malformed_jsonl(sample, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": \n')
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "p.jsonl")))
    assert_one_line_error(capsys, code, f"{tmp_path / 'p.jsonl'}:2")
    (tmp_path / "q.jsonl").write_text('{"text": "a cat"}\n')
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "q.jsonl")))
    assert_one_line_error(capsys, code, f"{tmp_path / 'q.jsonl'}:1", "'prompt'")


def test_sample_missing_or_bad_prompt_embeds(sample, tmp_path, capsys):
    code = sample(_sample_args(tmp_path, "--prompt-embeds", str(tmp_path / "missing.pt")))
    assert_one_line_error(capsys, code, "--prompt-embeds", tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    code = sample(_sample_args(tmp_path, "--prompt-embeds", str(tmp_path / "garbage.pt")))
    assert_one_line_error(capsys, code, tmp_path / "garbage.pt", "not a torch.save'd file")
    torch.save([1, 2], tmp_path / "list.pt")
    code = sample(_sample_args(tmp_path, "--prompt-embeds", str(tmp_path / "list.pt")))
    assert_one_line_error(capsys, code, tmp_path / "list.pt", "'embeds'")
    torch.save({"embeds": torch.zeros(2, 4, 8), "prompts": ["a"]}, tmp_path / "count.pt")
    with pytest.raises(BadFileError, match="1 prompts for 2 embeddings"):
        load_prompt_embeds(tmp_path / "count.pt")


def test_sample_checkpoint_folder_that_does_not_exist(sample, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    # no --config: used to say "--config is required" instead of naming the folder
    code = sample(
        ["--checkpoint", str(tmp_path / "no_run"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(capsys, code, "--checkpoint", tmp_path / "no_run", "no such folder")
    with pytest.raises(MissingWeightsError, match="no such folder"):
        resolve_generator_folder(tmp_path / "no_run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run dir without an export
    code = sample(
        ["--checkpoint", str(tmp_path / "run"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(capsys, code, tmp_path / "run", "export/")


def test_sample_checkpoint_without_run_config_asks_for_config(sample, tiny_models, tmp_path, capsys):
    shutil.copytree(tiny_models / "generator", tmp_path / "export" / "transformer")
    (tmp_path / "p.txt").write_text("a cat\n")
    code = sample(
        ["--checkpoint", str(tmp_path / "export"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(capsys, code, "--config is required", tmp_path / "export")


def test_sample_other_bad_inputs(sample, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "p.txt"), "--generator", str(tmp_path / "nope")))
    assert_one_line_error(capsys, code, "--generator", tmp_path / "nope")
    (tmp_path / "gen").mkdir()
    code = sample(
        _sample_args(tmp_path, "--prompts", str(tmp_path / "p.txt"), "--generator", str(tmp_path / "gen"), "--teacher")
    )
    assert_one_line_error(capsys, code, "--teacher")
    code = sample(_sample_args(tmp_path, "--prompts", str(tmp_path / "p.txt"), "video.num_frames=10"))
    assert_one_line_error(capsys, code, "video.num_frames")
    code = sample(
        _sample_args(tmp_path, "--prompts", str(tmp_path / "p.txt"), "models.root=" + str(tmp_path / "no_wan"))
    )
    assert_one_line_error(capsys, code, tmp_path / "no_wan")


# --------------------------------------------------------------------------- the real entry points


def test_real_entry_points_exit_2_without_traceback(tmp_path):
    for argv in (
        [
            sys.executable,
            str(REPO / "launch" / "sample.py"),
            "--config",
            "tiny",
            "--prompts",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        [sys.executable, "-m", "mogan_ds", "info", "--config", "tiny", "logging.log_every=0"],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
