import subprocess
import sys

from mogan_ds.config import load_config
from mogan_ds.info import plan_networks

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
    cfg = load_config("wan2.1-t2v-1.3b", [f"models.root={tiny_models / 'wan'}", "gan.disc_blocks=3", "gan.head_blocks=[0,1,2]"])
    plans, source = plan_networks(cfg)
    assert source.startswith("folder")
    from mogan_ds.models.builders import load_transformer

    real = sum(p.numel() for p in load_transformer(tiny_models / "wan" / "transformer").parameters())
    assert {p.name: p.params for p in plans}["generator"] == real


def test_info_cli_prints_the_counts(repo_root):
    out = subprocess.run([sys.executable, "-m", "mogan_ds", "info", "--config", "wan2.1-t2v-1.3b"],
                         capture_output=True, text=True, cwd=repo_root, check=True).stdout
    assert "1,418,996,800" in out and "resolved config" in out


def test_info_cli_bad_key_exits_2(repo_root):
    r = subprocess.run([sys.executable, "-m", "mogan_ds", "info", "--config", "tiny", "gan.nope=1"],
                       capture_output=True, text=True, cwd=repo_root)
    assert r.returncode == 2 and "gan.nope" in r.stderr
