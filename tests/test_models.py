import pytest
import torch

from mogan_ds.models import builders


def test_tiny_folders_round_trip(tiny_models):
    wan = builders.wan_paths(tiny_models / "wan")
    tr = builders.load_transformer(wan["transformer"])
    gen = builders.load_transformer(tiny_models / "generator")
    assert all(torch.equal(a, b) for a, b in zip(tr.state_dict().values(), gen.state_dict().values()))
    vae = builders.load_vae(wan["vae"])
    assert not any(p.requires_grad for p in vae.parameters())
    enc = builders.load_text_encoder(wan["text_encoder"])
    tok = builders.load_tokenizer(wan["tokenizer"])
    ids = tok(["a red ball"], return_tensors="pt").input_ids
    assert enc(ids).last_hidden_state.shape[-1] == tr.config.text_dim
    raft = builders.load_raft(tiny_models / "raft_small.pth", "raft_small")
    assert not raft.training


def test_truncated_transformer_keeps_leading_blocks(tiny_models):
    path = tiny_models / "wan" / "transformer"
    full = builders.load_transformer(path)
    part = builders.load_transformer(path, num_layers=2)
    assert len(part.blocks) == 2 and part.config.num_layers == 2
    sd_full, sd_part = full.state_dict(), part.state_dict()
    assert set(sd_part) == {k for k in sd_full if not k.startswith(("blocks.2.", "blocks.3."))}
    assert all(torch.equal(sd_part[k], sd_full[k]) for k in sd_part)
    # bf16 load keeps diffusers' fp32 modules in fp32, as from_pretrained does
    a = builders.load_transformer(path, dtype=torch.bfloat16, num_layers=2)
    b = builders.load_transformer(path, dtype=torch.bfloat16)
    db = dict(b.named_parameters())
    assert all(p.dtype == db[n].dtype for n, p in a.named_parameters())
    with pytest.raises(ValueError, match="only 4"):
        builders.load_transformer(path, num_layers=9)


def test_missing_weights_say_what_was_expected_where(tmp_path):
    with pytest.raises(builders.MissingWeightsError, match=str(tmp_path / "nope")):
        builders.load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(builders.MissingWeightsError, match="config.json"):
        builders.load_vae(tmp_path / "empty")
    with pytest.raises(builders.MissingWeightsError, match="raft_large"):
        builders.load_raft(tmp_path / "raft.pth", "raft_large")
    with pytest.raises(builders.MissingWeightsError, match="tokenizer_config.json"):
        builders.load_tokenizer(tmp_path / "empty")


def test_raft_weights_of_the_wrong_arch_are_rejected(tiny_models):
    with pytest.raises(ValueError, match="do not match raft_large"):
        builders.load_raft(tiny_models / "raft_small.pth", "raft_large")


def test_frozen_bf16_teacher_keeps_diffusers_fp32_modules(tiny_models):
    """freeze() moves a replica, it does not re-cast it: a bf16 Wan teacher keeps its norms, RoPE
    and time embedder in fp32 exactly as from_pretrained(torch_dtype=bf16) left them."""
    path = tiny_models / "wan" / "transformer"
    loaded = builders.load_transformer(path, torch.bfloat16)
    before = {n: p.dtype for n, p in loaded.named_parameters()}
    assert torch.float32 in before.values() and torch.bfloat16 in before.values()
    # Inputs are cast to the bulk's dtype, not the first parameter's (an fp32 modulation table).
    assert next(loaded.parameters()).dtype == torch.float32 and builders.weights_dtype(loaded) == torch.bfloat16
    frozen = builders.freeze(loaded, torch.device("cpu"))
    assert {n: p.dtype for n, p in frozen.named_parameters()} == before
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
