"""Load every network of MoGAN from local folders; nothing is downloaded.

The layout is the public Wan2.1-T2V-1.3B-Diffusers release::

    <root>/transformer/   WanTransformer3DModel   (teacher; fake-score init; D init)
    <root>/vae/           AutoencoderKLWan
    <root>/text_encoder/  UMT5EncoderModel        (offline prompt encoding only)
    <root>/tokenizer/     any AutoTokenizer

plus a generator transformer folder (the DMD-distilled 3-step model) and a torchvision
RAFT state dict. Every loader checks the path first and says what it expected where.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from torchvision.models.optical_flow import raft_large, raft_small
from transformers import AutoTokenizer, UMT5EncoderModel

from ..errors import BadFileError
from .weights_files import load_weights_file, state_dict_of

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MissingWeightsError(FileNotFoundError):
    """A weights folder or file is missing; the message says what was expected where."""


def weights_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a model computes in: that of most of its floating parameters.

    Not the first parameter's: a bf16 Wan model keeps small modules in fp32
    (`_keep_in_fp32_modules`: norms, time embedder, the modulation table that comes first in
    `parameters()`), and its inputs must match the bulk (patch embedding, attention). ZeRO-3
    partitions count with their full size (`ds_numel`).
    """
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + getattr(p, "ds_numel", p.numel())
    return max(counts, key=counts.get) if counts else None


def freeze(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen replica on `device`: eval mode, no grads, in the dtype(s) it was loaded with.

    No dtype cast here: the loaders set the precision, and diffusers keeps some modules of a
    bf16 Wan model in fp32 (`_keep_in_fp32_modules`: norms, RoPE, time embedder). A blanket
    `.to(dtype)` would cast those to bf16 as well.
    """
    return module.to(device=device).requires_grad_(False).eval()


def _expect_folder(path: str | os.PathLike, what: str, marker: str = "config.json") -> Path:
    p = Path(path)
    if not str(path):
        raise MissingWeightsError(f"{what}: no path configured")
    if not p.is_dir():
        raise MissingWeightsError(f"{what}: expected a diffusers-format folder at {p}, found nothing there")
    if marker and not (p / marker).is_file():
        raise MissingWeightsError(
            f"{what}: expected {p / marker} (a diffusers/transformers folder written by save_pretrained)"
        )
    return p


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """A `WanTransformer3DModel` from a diffusers folder.

    `num_layers` keeps only the first N blocks (the discriminator's backbone): the model
    is built with N blocks and the checkpoint's later blocks are never instantiated.
    """
    p = _expect_folder(path, "Wan transformer")
    if num_layers is None:
        return WanTransformer3DModel.from_pretrained(p, torch_dtype=dtype)
    model = WanTransformer3DModel.from_config(transformer_config(p, num_layers))
    state = read_safetensors_folder(p, keep=lambda k: not is_block_at_or_after(k, num_layers))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: truncated load mismatched, missing {missing[:5]}, unexpected {unexpected[:5]}")
    _cast_keeping_fp32(model, dtype)
    return model


def transformer_config(path: str | os.PathLike, num_layers: int | None = None) -> dict:
    """The `WanTransformer3DModel` config of a diffusers folder, optionally cut to its first `num_layers` blocks."""
    p = _expect_folder(path, "Wan transformer")
    config = dict(WanTransformer3DModel.load_config(p))
    if num_layers is not None:
        if num_layers > config["num_layers"]:
            raise ValueError(f"asked for {num_layers} blocks of {p}, which has only {config['num_layers']}")
        config["num_layers"] = num_layers
    return config


def keep_fp32_rule(model: torch.nn.Module):
    """diffusers' rule, name -> bool: a tensor stays fp32 when a part of its dotted name is in ``_keep_in_fp32_modules``."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return lambda name: bool(keep.intersection(name.split(".")))


def _cast_keeping_fp32(model, dtype: torch.dtype) -> None:
    """Cast like diffusers' from_pretrained(torch_dtype=...): `_keep_in_fp32_modules` stay fp32."""
    keep = keep_fp32_rule(model)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if keep(name) else dtype)


def is_block_at_or_after(key: str, n: int) -> bool:
    """Whether checkpoint key `key` belongs to block n or a later one (not built by a truncated copy)."""
    m = re.match(r"blocks\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= n


def read_safetensors_folder(folder: str | os.PathLike, keep=lambda k: True) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors folder whose key passes `keep`."""
    by_file: dict[Path, list[str]] = {}
    for k, f in safetensors_index(folder).items():
        if keep(k):
            by_file.setdefault(f, []).append(k)
    state = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for k in keys:
                state[k] = fh.get_tensor(k)
    return state


def safetensors_index(folder: str | os.PathLike) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file that holds it, for a diffusers/transformers weights folder.

    A sharded folder (``*.safetensors.index.json`` with a ``weight_map``, as save_pretrained
    writes past ``max_shard_size``) is read from its index; otherwise every ``*.safetensors``
    file's header is read (a single-file folder). Only headers are read here.
    """
    p = Path(folder)
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise MissingWeightsError(f"{p}: several safetensors indexes {[i.name for i in indexes]}; expected one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        out = {k: p / f for k, f in weight_map.items()}
        missing = sorted({f.name for f in out.values() if not f.is_file()})
        if missing:
            raise MissingWeightsError(f"{indexes[0]} names shards that are not there: {missing[:5]}")
        return out
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise MissingWeightsError(f"{p}: no *.safetensors weights found next to config.json")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in out:
                    raise MissingWeightsError(f"{p}: tensor {k} is in both {out[k].name} and {f.name}")
                out[k] = f
    return out


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    p = _expect_folder(path, "Wan VAE")
    vae = AutoencoderKLWan.from_pretrained(p, torch_dtype=dtype)
    vae.requires_grad_(False).eval()
    return vae


def load_text_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    p = _expect_folder(path, "UMT5 text encoder")
    enc = UMT5EncoderModel.from_pretrained(p, dtype=dtype)
    enc.requires_grad_(False).eval()
    return enc


def load_tokenizer(path: str | os.PathLike):
    p = _expect_folder(path, "tokenizer", marker="tokenizer_config.json")
    return AutoTokenizer.from_pretrained(p)


def build_raft(arch: str):
    """An untrained torchvision RAFT of the given architecture (weights=None: no download)."""
    builders = {"raft_large": raft_large, "raft_small": raft_small}
    if arch not in builders:
        raise ValueError(f"unknown RAFT architecture {arch!r}; choose one of {sorted(builders)}")
    return builders[arch](weights=None, progress=False)


def load_raft(path: str | os.PathLike, arch: str = "raft_large", dtype: torch.dtype = torch.float32):
    """torchvision RAFT with a local state dict, frozen and in eval mode (BatchNorm in raft_large)."""
    p = Path(path)
    if not str(path) or not p.is_file():
        raise MissingWeightsError(
            f"RAFT weights: expected a torchvision {arch} state dict (.pth) at {p}; "
            "torchvision's Raft_Large_Weights/Raft_Small_Weights files work as they are"
        )
    model = build_raft(arch)
    expected = f"a torchvision {arch} state dict"
    state = state_dict_of(load_weights_file(p, expected), p, expected)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise BadFileError(f"RAFT weights at {p} do not match {arch}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise BadFileError(
            f"RAFT weights at {p} do not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.to(dtype=dtype).requires_grad_(False).eval()
    return model


def wan_paths(root: str | os.PathLike) -> dict[str, Path]:
    """The sub-folders of a Wan diffusers release."""
    r = Path(root)
    return {k: r / k for k in ("transformer", "vae", "text_encoder", "tokenizer")}


def read_transformer_config(path: str | os.PathLike) -> dict:
    p = _expect_folder(path, "Wan transformer")
    with open(p / "config.json") as fh:
        return json.load(fh)
