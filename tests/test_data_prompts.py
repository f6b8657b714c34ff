"""Prompt embeddings: identical to WanPipeline's, special embeddings (Wan's negative prompt,
checked against the recipe), rank split, exact resume."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from diffusers import WanPipeline
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from mogan_ds.config import load_config
from mogan_ds.data.prompts import (
    NegativePromptMismatchError,
    PromptEmbeddings,
    clean_prompt,
    encode_prompt_folder,
    load_special_embeddings,
    read_prompts,
)
from mogan_ds.data.wan_prompts import WAN_NEGATIVE_PROMPT
from mogan_ds.models.builders import load_text_encoder, load_tokenizer
from mogan_ds.models.tiny import TINY_TEXT_ENCODER

PROMPTS = [
    f"a {c} ball rolls {d}"
    for c in ("red", "blue", "green", "yellow", "white")
    for d in ("left", "right", "  down   the hill ")
]


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """The tiny UMT5 encoder and byte-level tokenizer of the tiny preset, via save_pretrained."""
    d = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER)).save_pretrained(d / "text_encoder")
    ByT5Tokenizer().save_pretrained(d / "tokenizer")
    return d


@pytest.fixture(scope="module")
def embeddings(text_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    prompts = read_prompts(str(d / "prompts.jsonl"))
    assert prompts == PROMPTS

    def encode():
        return encode_prompt_folder(
            prompts,
            str(text_models / "text_encoder"),
            str(text_models / "tokenizer"),
            str(d / "out"),
            max_length=40,
            prompts_per_shard=4,
            batch_size=3,
            disc_prompt="a video with good motion",
            echo=lambda s: None,
        )

    meta = encode()
    assert meta["num_prompts"] == 15 and len(meta["shards"]) == 4 and meta["dim"] == 32
    mtime = os.path.getmtime(d / "out" / "meta.json")
    encode()  # up to date: nothing is re-encoded
    assert os.path.getmtime(d / "out" / "meta.json") == mtime
    return str(d / "out")


def wan_embeds(text_models, prompts, max_length):
    """diffusers' own WanPipeline._get_t5_prompt_embeds on the same encoder and tokenizer."""
    pipe = types.SimpleNamespace(
        tokenizer=load_tokenizer(text_models / "tokenizer"),
        text_encoder=load_text_encoder(text_models / "text_encoder"),
    )
    return WanPipeline._get_t5_prompt_embeds(
        pipe, prompt=prompts, max_sequence_length=max_length, device=torch.device("cpu"), dtype=torch.float32
    )


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
    # the CFG negative is Wan's standard negative prompt unless asked otherwise
    assert torch.equal(special["negative"], wan_embeds(text_models, [WAN_NEGATIVE_PROMPT], 40))
    assert torch.equal(special["disc"], wan_embeds(text_models, ["a video with good motion"], 40))
    assert set(batch["prompt"]) <= {" ".join(p.split()) for p in PROMPTS} | set(PROMPTS)


def test_ranks_are_disjoint_and_cover_the_prompts(embeddings):
    seen = []
    for r in range(3):  # 4 shards over 3 ranks: rank 0 gets two; blocks of 4 keep one cycle first
        keys = [
            k
            for b in drain(
                PromptEmbeddings(embeddings, dp_rank=r, dp_size=3, seed=1, batch_size=2, shuffle_buffer=4), 4
            )
            for k in b["key"]
        ]
        seen.append(set(keys))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == {f"{i:08d}" for i in range(15)}
    # 8 ranks > 4 shards: prompts are split by position and still disjoint
    many = [
        {
            k
            for b in drain(
                PromptEmbeddings(embeddings, dp_rank=r, dp_size=8, seed=1, batch_size=1, shuffle_buffer=1), 4
            )
            for k in b["key"]
        }
        for r in range(8)
    ]
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
        PromptEmbeddings(embeddings, dp_rank=0, dp_size=1, seed=4, batch_size=4, shuffle_buffer=5).load_state_dict(
            state
        )
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PromptEmbeddings(os.path.dirname(embeddings), 0, 1, 0, 1)


def test_negative_prompt_is_recorded_and_checked_against_the_recipe(embeddings, text_models, tmp_path):
    meta = json.load(open(os.path.join(embeddings, "meta.json"), encoding="utf-8"))
    assert meta["negative_prompt"] == WAN_NEGATIVE_PROMPT and "静止不动的画面" in WAN_NEGATIVE_PROMPT
    assert load_config("tiny").text.negative_prompt == WAN_NEGATIVE_PROMPT  # recipe default = encoder default
    assert load_config("wan2.1-t2v-1.3b").text.negative_prompt == WAN_NEGATIVE_PROMPT
    load_special_embeddings(embeddings, WAN_NEGATIVE_PROMPT)  # matches: no error
    with pytest.raises(
        NegativePromptMismatchError,
        match=r"text.negative_prompt is the empty prompt, but the prompt embeddings in .*\(data.prompts\) were encoded with Wan's standard",
    ):
        load_special_embeddings(embeddings, "")
    # the empty prompt is an option (diffusers' default), and then it is what the recipe must say
    empty = encode_prompt_folder(
        ["a ball"],
        str(text_models / "text_encoder"),
        str(text_models / "tokenizer"),
        str(tmp_path / "empty"),
        max_length=40,
        negative_prompt="",
        echo=lambda s: None,
    )
    assert empty["negative_prompt"] == ""
    special = load_special_embeddings(str(tmp_path / "empty"), "")
    assert torch.equal(special["negative"], wan_embeds(text_models, [""], 40))
    with pytest.raises(NegativePromptMismatchError, match="encoded with the empty prompt"):
        load_special_embeddings(str(tmp_path / "empty"), WAN_NEGATIVE_PROMPT)
    # a folder from before the prompt was recorded at the top level keeps it in its identity
    old = dict(empty)
    del old["negative_prompt"]
    (tmp_path / "empty" / "meta.json").write_text(json.dumps(old))
    load_special_embeddings(str(tmp_path / "empty"), "")
    del old["identity"]["negative_prompt"]
    (tmp_path / "empty" / "meta.json").write_text(json.dumps(old))
    with pytest.raises(NegativePromptMismatchError, match="encoded with an unrecorded negative prompt"):
        load_special_embeddings(str(tmp_path / "empty"), "")


def test_encode_prompts_command_line_takes_the_empty_negative_prompt(text_models, tmp_path, repo_root):
    (tmp_path / "p.txt").write_text("a red ball\n\na blue cube\n")
    r = subprocess.run(
        [
            sys.executable,
            "data_tools/encode_prompts.py",
            "--prompts",
            str(tmp_path / "p.txt"),
            "--text-encoder",
            str(text_models / "text_encoder"),
            "--tokenizer",
            str(text_models / "tokenizer"),
            "--max-length",
            "24",
            "--out",
            str(tmp_path / "out"),
            "--empty-negative-prompt",
            "--device",
            "cpu",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "out" / "meta.json", encoding="utf-8"))
    assert meta["num_prompts"] == 2 and meta["negative_prompt"] == ""
    assert torch.equal(
        load_special_embeddings(str(tmp_path / "out"), "")["negative"], wan_embeds(text_models, [""], 24)
    )
