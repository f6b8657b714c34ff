"""Prompt embeddings: identical to WanPipeline's, special embeddings, rank split, exact resume."""

import json
import os
import sys
import types

import pytest
import torch

from mogan_ds.data.prompts import PromptEmbeddings, clean_prompt, load_special_embeddings
from mogan_ds.models.builders import load_text_encoder, load_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_tools"))
import encode_prompts  # noqa: E402

PROMPTS = [f"a {c} ball rolls {d}" for c in ("red", "blue", "green", "yellow", "white") for d in ("left", "right", "  down   the hill ")]


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """The tiny UMT5 encoder and byte-level tokenizer of the tiny preset, via save_pretrained."""
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from mogan_ds.models.tiny import TINY_TEXT_ENCODER

    d = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER)).save_pretrained(d / "text_encoder")
    ByT5Tokenizer().save_pretrained(d / "tokenizer")
    return d


@pytest.fixture(scope="module")
def embeddings(text_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    argv = ["--prompts", str(d / "prompts.jsonl"), "--text-encoder", str(text_models / "text_encoder"), "--tokenizer", str(text_models / "tokenizer"),
            "--max-length", "40", "--out", str(d / "out"), "--prompts-per-shard", "4", "--batch-size", "3", "--disc-prompt", "a video with good motion"]
    meta = encode_prompts.main(argv)
    assert meta["num_prompts"] == 15 and len(meta["shards"]) == 4 and meta["dim"] == 32
    mtime = os.path.getmtime(d / "out" / "meta.json")
    encode_prompts.main(argv)  # up to date: nothing is re-encoded
    assert os.path.getmtime(d / "out" / "meta.json") == mtime
    return str(d / "out")


def wan_embeds(text_models, prompts, max_length):
    """diffusers' own WanPipeline._get_t5_prompt_embeds on the same encoder and tokenizer."""
    from diffusers import WanPipeline

    pipe = types.SimpleNamespace(tokenizer=load_tokenizer(text_models / "tokenizer"), text_encoder=load_text_encoder(text_models / "text_encoder"))
    return WanPipeline._get_t5_prompt_embeds(pipe, prompt=prompts, max_sequence_length=max_length, device=torch.device("cpu"), dtype=torch.float32)


def drain(stream, n):
    out = []
    for b in stream:
        out.append(b)
        if len(out) == n:
            return out


def test_embeddings_equal_wan_pipeline_and_special_prompts(embeddings, text_models):
    batch = drain(PromptEmbeddings(embeddings, dp_rank=0, dp_size=1, seed=0, batch_size=5), 1)[0]
    assert batch["embeds"].shape == (5, 40, 32) and batch["embeds"].dtype == torch.float32
    ref = wan_embeds(text_models, batch["prompt"], 40)
    assert torch.equal(batch["embeds"], ref)
    # rows past each prompt's length (bytes + EOS for the byte-level tokenizer) are zero
    for emb, prompt in zip(batch["embeds"], batch["prompt"]):
        n = len(clean_prompt(prompt).encode()) + 1
        assert n < 40 and (emb[:n].abs().sum(-1) > 0).all() and (emb[n:] == 0).all()
    special = load_special_embeddings(embeddings)
    assert special["negative"].shape == special["disc"].shape == (1, 40, 32)
    assert torch.equal(special["negative"], wan_embeds(text_models, [""], 40))
    assert torch.equal(special["disc"], wan_embeds(text_models, ["a video with good motion"], 40))
    assert set(batch["prompt"]) <= {" ".join(p.split()) for p in PROMPTS} | set(PROMPTS)


def test_ranks_are_disjoint_and_cover_the_prompts(embeddings):
    seen = []
    for r in range(3):  # 4 shards over 3 ranks: rank 0 gets two; blocks of 4 keep one cycle first
        keys = [k for b in drain(PromptEmbeddings(embeddings, dp_rank=r, dp_size=3, seed=1, batch_size=2, shuffle_buffer=4), 4) for k in b["key"]]
        seen.append(set(keys))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == {f"{i:08d}" for i in range(15)}
    # 8 ranks > 4 shards: prompts are split by position and still disjoint
    many = [{k for b in drain(PromptEmbeddings(embeddings, dp_rank=r, dp_size=8, seed=1, batch_size=1, shuffle_buffer=1), 4) for k in b["key"]} for r in range(8)]
    assert sum(len(s) for s in many) == len(set().union(*many)) == 15


def test_resume_is_exact(embeddings):
    ref = PromptEmbeddings(embeddings, dp_rank=0, dp_size=1, seed=3, batch_size=4, shuffle_buffer=5)
    drain(ref, 3)
    state = json.loads(json.dumps(ref.state_dict()))
    tail = drain(ref, 6)  # crosses the 15-prompt cycle: resampling never runs dry
    resumed = PromptEmbeddings(embeddings, dp_rank=0, dp_size=1, seed=3, batch_size=4, shuffle_buffer=5)
    resumed.load_state_dict(state)
    again = drain(resumed, 6)
    assert [b["key"] for b in again] == [b["key"] for b in tail]
    assert all(torch.equal(a["embeds"], b["embeds"]) for a, b in zip(again, tail))
    assert resumed.stats() == ref.stats()
    with pytest.raises(ValueError, match="seed"):
        PromptEmbeddings(embeddings, dp_rank=0, dp_size=1, seed=4, batch_size=4, shuffle_buffer=5).load_state_dict(state)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PromptEmbeddings(os.path.dirname(embeddings), 0, 1, 0, 1)
