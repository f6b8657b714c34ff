import subprocess
import sys

import pytest
import torch

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


def test_lora_roles_are_sized_as_adapters_on_frozen_bases():
    """models.lora.<role>: only the adapters (and D's fresh heads) carry train state; the fake score's base
    is the teacher's own (share_teacher_base), so it adds no second base."""
    lora = [f"models.lora.{r}.enabled=true" for r in ("generator", "fake_score", "discriminator")]
    full = {p.name: p for p in plan_networks(load_config("wan2.1-t2v-1.3b"))[0]}
    by = {p.name: p for p in plan_networks(load_config("wan2.1-t2v-1.3b", [*lora, "models.lora.generator.rank=16"]))[0]}

    # the generator's adapters, counted from the DiT's own Linear shapes: r * (in + out) per adapted projection
    from diffusers import WanTransformer3DModel

    from mogan_ds.models.presets import architecture

    cfg = load_config("wan2.1-t2v-1.3b")
    targets = cfg.models.lora.generator.target_modules
    with torch.device("meta"):
        dit = WanTransformer3DModel.from_config(
            {k: v for k, v in architecture(cfg.models)[0]["transformer"].items() if not k.startswith("_")}
        )
    expected = sum(
        16 * (m.in_features + m.out_features)
        for n, m in dit.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    )
    g = by["generator"]
    assert g.trained == expected and g.params == WAN_1_3B_PARAMS + expected
    assert g.train_state_bytes == expected * 16
    assert g.resident_bytes == expected * 16 + WAN_1_3B_PARAMS * 2  # + the frozen bf16 base
    fs = by["fake_score"]
    assert fs.shares_base and fs.resident_bytes == fs.train_state_bytes == fs.trained * 16
    d = by["discriminator"]
    assert 0 < d.trained < full["discriminator"].params < d.params  # adapters + heads train, the blocks do not
    assert by["teacher"].resident_bytes == full["teacher"].resident_bytes
    # the rank: the generator (r=16) has a quarter of the fake score's (r=64) adapters
    assert fs.trained == 4 * g.trained


def test_info_prints_lora_roles(capsys):
    assert main(["info", "--config", "wan2.1-t2v-1.3b", "models.lora.generator.enabled=true"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=64" in out and "adapter parameters on frozen bf16 base" in out
