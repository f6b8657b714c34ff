"""DeepSpeed's CUDA ops (FusedAdam) are JIT-compiled at first use: make their build read the machine's arch list.

PyTorch accepts arch-specific entries in ``TORCH_CUDA_ARCH_LIST`` such as ``9.0a`` (Hopper's
wgmma / TMA instructions) or ``10.0f``, and CUDA images for Hopper set them. DeepSpeed 0.19's
JIT builder (``op_builder/builder.py``, ``compute_capability_args``) parses each entry's minor
version with ``int()`` and stops with ``ValueError: invalid literal for int() with base 10: '0a'``:
seen on an H200 machine (torch 2.11, CUDA 13.0), where FusedAdam then could not build and the
run had to fall back on torch's AdamW. FusedAdam uses none of those instructions: the plain
``X.Y`` target of the same chip builds the same kernel, so the suffix is dropped for the build.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

ARCH_LIST = "TORCH_CUDA_ARCH_LIST"
# "9.0", "9.0a", "10.0f", "8.6+PTX", "9.0a+PTX": major.minor, an optional family/arch-specific letter, +PTX.
_ENTRY = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


def deepspeed_arch_list(environ: dict | None = None) -> str | None:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` in `environ` (default ``os.environ``) into entries DeepSpeed's
    builder parses (``9.0a`` -> ``9.0``, ``+PTX`` kept, duplicates dropped); returns a line saying
    what changed, or None when nothing needed to (unset, or every entry already plain). An entry
    this does not recognise is left for DeepSpeed to report."""
    env = os.environ if environ is None else environ
    value = env.get(ARCH_LIST)
    if not value or not value.strip():
        return None
    entries = [e for e in re.split(r"[;\s]+", value.strip()) if e]
    plain = []
    for entry in entries:
        m = _ENTRY.match(entry)
        fixed = f"{m[1]}.{m[2]}{m[4] or ''}" if m else entry
        if fixed not in plain:
            plain.append(fixed)
    if plain == entries:
        return None
    env[ARCH_LIST] = ";".join(plain)
    return (
        f"{ARCH_LIST}={value!r} -> {env[ARCH_LIST]!r} for DeepSpeed's op builds (it cannot parse arch-specific entries)"
    )


def prepare_op_builds() -> None:
    """Call before DeepSpeed builds an op (deepspeed.initialize with FusedAdam); logs a change once."""
    note = deepspeed_arch_list()
    if note:
        log.info("%s", note)
