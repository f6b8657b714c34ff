"""Load VBench's RAFT checkpoint (princeton-vl layout, raft-things.pth) into torchvision's raft_large.

VBench's `DynamicDegree.load_model` (vbench/dynamic_degree.py) builds the original RAFT
(`vbench/third_party/RAFT/core/raft.py`, small=False) and loads raft-things.pth after
stripping DataParallel's "module." prefix. torchvision's `raft_large` is the same network
(torchvision's own C_T weights were ported from that repository), with other module
names: the mapping below renames keys only; no tensor needs a reshape or permutation
(the correlation window's (dy, dx) ordering and the GRU's [h, x] concatenation order are
the same in both). The original's residual blocks register their BatchNorm twice
(``norm3`` and ``downsample.1`` are one module), so ``norm3`` is dropped on the way in
and re-created on the way out.

Each row pairs an original key template with torchvision's; ``<e>`` is the encoder
(fnet -> feature_encoder, cnet -> context_encoder), ``<l>``/``<b>`` layer and block
indices, ``<g>`` a GRU gate (z, r, q), and the rest of the key (weight, bias, BatchNorm
buffers) follows unchanged.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import BadFileError
from ..models.weights_files import load_state_strict, load_weights_file, state_dict_of

_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}
_ENCODERS_INV = {v: k for k, v in _ENCODERS.items()}

_ROWS: tuple[tuple[str, str], ...] = (
    ("<e>.conv1.", "<e>.convnormrelu.0."),
    ("<e>.norm1.", "<e>.convnormrelu.1."),
    ("<e>.conv2.", "<e>.conv."),
    ("<e>.layer<l>.<b>.conv1.", "<e>.layer<l>.<b>.convnormrelu1.0."),
    ("<e>.layer<l>.<b>.norm1.", "<e>.layer<l>.<b>.convnormrelu1.1."),
    ("<e>.layer<l>.<b>.conv2.", "<e>.layer<l>.<b>.convnormrelu2.0."),
    ("<e>.layer<l>.<b>.norm2.", "<e>.layer<l>.<b>.convnormrelu2.1."),
    ("<e>.layer<l>.<b>.downsample.", "<e>.layer<l>.<b>.downsample."),
    ("update_block.encoder.convc1.", "update_block.motion_encoder.convcorr1.0."),
    ("update_block.encoder.convc2.", "update_block.motion_encoder.convcorr2.0."),
    ("update_block.encoder.convf1.", "update_block.motion_encoder.convflow1.0."),
    ("update_block.encoder.convf2.", "update_block.motion_encoder.convflow2.0."),
    ("update_block.encoder.conv.", "update_block.motion_encoder.conv.0."),
    ("update_block.gru.conv<g>1.", "update_block.recurrent_block.convgru1.conv<g>."),
    ("update_block.gru.conv<g>2.", "update_block.recurrent_block.convgru2.conv<g>."),
    ("update_block.flow_head.", "update_block.flow_head."),
    ("update_block.mask.0.", "mask_predictor.convrelu.0."),
    ("update_block.mask.2.", "mask_predictor.conv."),
)

_GROUPS = {"<e>": r"(?P<e>[a-z_]+)", "<l>": r"(?P<l>\d+)", "<b>": r"(?P<b>\d+)", "<g>": r"(?P<g>[zrq])"}
# The duplicate BatchNorm of a strided residual block in the original layout.
_ALIAS = re.compile(r"^(?P<pre>(?:fnet|cnet)\.layer\d+\.\d+\.)norm3\.(?P<rest>.+)$")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for token, group in _GROUPS.items():
        pattern = pattern.replace(re.escape(token), group)
    return re.compile("^" + pattern + r"(?P<rest>.+)$")


def _fill(template: str, groups: dict[str, str]) -> str:
    out = template
    for token in _GROUPS:
        name = token[1:-1]
        if token in out:
            out = out.replace(token, groups[name])
    return out + groups["rest"]


_FORWARD = [(_compile(o), t) for o, t in _ROWS]
_BACKWARD = [(_compile(t), o) for o, t in _ROWS]


def _rename(key: str, table, encoders: dict[str, str]) -> str:
    for pattern, template in table:
        m = pattern.match(key)
        if m is None:
            continue
        groups = m.groupdict()
        if "e" in groups and groups["e"] is not None:
            if groups["e"] not in encoders:
                continue
            groups["e"] = encoders[groups["e"]]
        return _fill(template, groups)
    raise KeyError(key)


def original_to_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """princeton-vl RAFT keys (optionally "module."-prefixed) -> torchvision raft_large keys."""
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        alias = _ALIAS.match(key)
        if alias is not None:
            twin = f"{alias['pre']}downsample.1.{alias['rest']}"
            if twin in sd:  # the same module under its other name: nothing new
                continue
            key = twin
        try:
            out[_rename(key, _FORWARD, _ENCODERS)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a RAFT (princeton-vl layout) state dict: unknown keys {unknown[:5]}")
    return out


def torchvision_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision raft_large keys -> princeton-vl RAFT keys (the inverse, with the norm3 aliases)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        orig = _rename(key, _BACKWARD, _ENCODERS_INV)
        out[orig] = value
        m = re.match(r"^((?:fnet|cnet)\.layer\d+\.\d+\.)downsample\.1\.(.+)$", orig)
        if m is not None:
            out[f"{m[1]}norm3.{m[2]}"] = value
    return out


def is_original_layout(state_dict: dict) -> bool:
    return any(k.split(".")[0] in ("module", "fnet", "cnet") for k in state_dict)


RAFT_FILE = "a RAFT checkpoint (VBench's raft-things.pth or a torchvision raft_large state dict)"


def load_raft_checkpoint(path: str | os.PathLike) -> torch.nn.Module:
    """torchvision raft_large (fp32, eval) from VBench's raft-things.pth or a torchvision state dict.

    Another file is a BadFileError naming it and what was expected."""
    from torchvision.models.optical_flow import raft_large

    data = state_dict_of(load_weights_file(path, RAFT_FILE), path, RAFT_FILE)
    try:
        sd = original_to_torchvision(data) if is_original_layout(data) else dict(data)
    except ValueError as e:
        raise BadFileError(f"{path}: not {RAFT_FILE}: {e}") from None
    model = raft_large(weights=None)
    # Checkpoints saved before BatchNorm counted its batches lack num_batches_tracked,
    # a counter that eval-mode BatchNorm never reads.
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    load_state_strict(model, sd, path, RAFT_FILE)
    return model.float().eval().requires_grad_(False)
