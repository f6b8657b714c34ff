import subprocess
import sys

import pytest

from mogan_ds.__main__ import main
from mogan_ds.cli.info import plan_networks
from mogan_ds.config import Config, field_help, load_config, to_dict

WAN_1_3B_PARAMS = 1_418_996_800


def test_paper_recipe_counts_without_weights():
    plans, source = plan_networks(load_config("wan2.1-t2v-1.3b"))
    by = {p.name: p for p in plans}
    assert source == "preset wan2.1-t2v-1.3b"
    for name in ("generator", "fake_score", "teacher"):
        assert by[name].params == WAN_1_3B_PARAMS
    # D = 16 of 30 blocks + heads: fewer than the DiT, more than its blocks' share alone
    assert 16 / 30 * WAN_1_3B_PARAMS * 0.5 < by["discriminator"].params < WAN_1_3B_PARAMS
    assert by["teacher"].weight_bytes == WAN_1_3B_PARAMS * 2  # bf16 frozen replica
    assert by["generator"].train_state_bytes == WAN_1_3B_PARAMS * 16


def test_folder_config_wins_over_preset(tiny_models):
    cfg = load_config(
        "wan2.1-t2v-1.3b", [f"models.root={tiny_models / 'wan'}", "gan.disc_blocks=3", "gan.head_blocks=[0,1,2]"]
    )
    plans, source = plan_networks(cfg)
    assert source.startswith("folder")
    from mogan_ds.models.builders import load_transformer

    real = sum(p.numel() for p in load_transformer(tiny_models / "wan" / "transformer").parameters())
    assert {p.name: p.params for p in plans}["generator"] == real


def test_info_cli_prints_the_counts(capsys):
    assert main(["info", "--config", "wan2.1-t2v-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "1,418,996,800" in out and "resolved config" in out


def test_info_runs_the_trainers_architecture_checks(capsys):
    # 12 heads in Wan2.1-1.3B: sp 5 cannot split them (the trainer checked this, info did not)
    assert main(["info", "--config", "wan2.1-t2v-1.3b", "parallel.sp_size=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.sp_size" in err[0] and "12 attention heads" in err[0]
    assert main(["info", "--config", "wan2.1-t2v-1.3b", "parallel.sp_size=4"]) == 0
    # D cannot keep more blocks than the DiT has (30)
    assert main(["info", "--config", "wan2.1-t2v-1.3b", "gan.disc_blocks=31", "gan.head_blocks=[30]"]) == 2
    assert "gan.disc_blocks" in capsys.readouterr().err


def test_info_takes_the_precision_from_the_ds_config(capsys, repo_root):
    # zero3_cpu.json enables neither bf16 nor fp16: the trainable networks plan in fp32
    assert main(["info", "--config", "tiny", "--ds_config", f"{repo_root}/ds_configs/zero3_cpu.json"]) == 0
    generator = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("generator "))
    assert generator[2] == "fp32"
    assert main(["info", "--config", "tiny"]) == 0  # no JSON: the cluster's bf16
    generator = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("generator "))
    assert generator[2] == "bf16"


def _flat(tree, prefix=""):
    for k, v in tree.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


def test_help_keys_lists_every_key_with_default_and_range(capsys):
    assert main(["info", "--help-keys"]) == 0
    out = capsys.readouterr().out
    helps = field_help()
    for key, default in _flat(to_dict(Config())):
        assert f"{key} = {default!r}\n    {helps[key]}" in out, key
    assert "logging.log_every = 1\n    Write metrics every N iterations. Range: >= 1." in out


@pytest.mark.parametrize(
    "overrides, key",
    [(["gan.nope=1"], "gan.nope"), (["gan.window=2", "parallel.sp_size=4"], "gan.window")],
)
def test_info_cli_bad_key_exits_2(repo_root, overrides, key):
    """The real entry point: exit code 2, one stderr line naming the key, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "mogan_ds", "info", "--config", "tiny", *overrides],
        capture_output=True,
        text=True,
        cwd=repo_root,
    )
    assert r.returncode == 2 and key in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
