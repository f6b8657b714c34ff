"""Reading ``.pth`` weights files safely: one loader for every such file the project reads.

Every ``.pth`` weights file (AMT-S, RAFT for evaluation and training, the LAION head,
MUSIQ) goes through `load_weights_file`: torch's weights-only unpickler (tensors and plain
containers, never code a file names), plus numpy's numeric scalars, which training
checkpoints carry in their optimizer state: AMT's own trainer saves
``{epoch, state_dict, optim}`` and its cosine schedule leaves a ``numpy.float64`` learning
rate there, so amt-s.pth as published holds one. A file that is not what a loader expects
is a `BadFileError` naming the file and what was expected (one stderr line, exit code 2 in
the command-line tools), never a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import BadFileError


def numpy_scalar_globals() -> list:
    """What unpickling a numpy numeric scalar needs, under numpy 1.x's and 2.x's module names.

    A scalar pickles as ``numpy.core.multiarray.scalar(numpy.dtype(code), raw bytes)``
    (``numpy._core`` when numpy 2 wrote it) and the dtype then gets its state set, which
    torch's unpickler allows only for allow-listed classes: the dtype classes of booleans,
    integers, floats and complex numbers. Object, string, void (structured) and datetime
    dtypes stay refused.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    numeric += (np.float16, np.float32, np.float64, np.complex64, np.complex128)
    dtype_classes = list(dict.fromkeys(type(np.dtype(t)) for t in numeric))
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        *(c for c in dtype_classes if c is not np.dtype),
    ]


def _numpy_scalars_allowed():
    """torch.load's weights-only allow-list plus `numpy_scalar_globals`, for the duration of one load.

    Only what is not already allowed is added, so leaving takes away nothing a caller allowed.
    """
    have = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in numpy_scalar_globals() if g not in have])


def _short(e: BaseException, limit: int = 200) -> str:
    """One line of an exception, without torch's advice to load the file unsafely."""
    text = " ".join(str(e).split())
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it names {m[1]}, which a weights-only load refuses"
    m = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation of torch\.load|$)", text)
    if m:
        text = m[1]
    elif "Weights only load failed" in text:
        text = ""
    return text[:limit] or type(e).__name__


def load_weights_file(path: str | os.PathLike, expected: str):
    """The object in a torch.save'd weights file, loaded weights-only (+ numpy numeric scalars).

    `expected` names what the file should be (e.g. "an AMT-S checkpoint (amt-s.pth)"); a
    folder, a file torch cannot read and a file that needs any other global are a
    `BadFileError` naming the path and `expected`. A missing file stays FileNotFoundError.
    """
    p = Path(path)
    if p.is_dir():
        raise BadFileError(f"{p}: a folder, not {expected}")
    try:
        with _numpy_scalars_allowed():
            return torch.load(p, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises pickle, zip, index and runtime errors for a foreign file
        raise BadFileError(f"{p}: not {expected}: torch cannot read it as weights ({_short(e)})") from None


def state_dict_of(data, path: str | os.PathLike, expected: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded weights file: the file itself, or its "state_dict" entry (a trainer's checkpoint)."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    ok = isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
    if not ok:
        kind = f"a dict with keys {sorted(map(str, data))[:5]}" if isinstance(data, dict) else type(data).__name__
        raise BadFileError(
            f"{path}: not {expected}: expected a state dict of tensors, alone or under 'state_dict', found {kind}"
        )
    return dict(data)


def mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], limit: int = 3) -> str:
    """How `state` differs from `model`'s state dict: missing and unknown keys, other shapes ("" when it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unknown = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for what, keys in (("missing keys", missing), ("unknown keys", unknown), ("other shapes", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
            parts.append(f"{what} {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path, expected: str) -> None:
    """`model.load_state_dict(state, strict=True)`; a mismatch is a BadFileError naming the file, expected and keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadFileError(f"{path}: not {expected}: {mismatch(model, state) or _short(e)}") from None
