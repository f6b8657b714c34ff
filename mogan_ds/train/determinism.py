"""`train.deterministic`: the same kernels' results on every run, so a resumed run on a GPU can be
compared bit for bit with an uninterrupted one (the CPU build is deterministic already).

On CUDA, bf16 training differs from run to run where kernels accumulate with atomics (attention and
convolution backward, scatter/index_add) or where cuBLAS splits a reduction by its workspace. On the
first H200 run a resume from step 2 reproduced the uninterrupted run's losses only to 5% relative
(benchmarks/results/2026-12-04_h200_2/); this switch is what tells kernel noise from a resume defect.
It costs speed (deterministic algorithms, cuDNN's autotuner off), so it is off by default.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# cuBLAS is deterministic with a fixed workspace configuration (CUDA's documented requirement);
# it must be in the environment before the first cuBLAS handle exists.
CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool) -> None:
    """Turn torch's deterministic algorithms on (warn only where an op has none) or leave the defaults."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # warn_only: an op without a deterministic kernel (some attention backwards) warns once and runs;
    # the resume comparison then shows whether it mattered.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
