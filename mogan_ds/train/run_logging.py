"""Where a training run's messages go: people read the console, everything is kept in files.

Console (stderr): on rank 0 the project's own INFO lines (the set-up summary, checkpoints,
resume), on every rank the project's warnings, and any library's errors. The progress bar
(tqdm, rank 0) writes there too.

Files: ``<run_dir>/logs/rank_NNNNN.log`` per rank receives every record at INFO and above
from every logger: the project's, DeepSpeed's, diffusers', transformers', and Python
warnings (deprecations such as torch.distributed's ``all_gather_into_tensor`` FutureWarning,
diffusers' "attention backends are experimental"). They ask nothing of the user, so they
are kept for the record but never printed once per rank.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging
from deepspeed.utils import logger as deepspeed_logger

PROJECT = "mogan_ds"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsolePolicy(logging.Filter):
    """The project's records from `project_level` up; other libraries' only from ERROR up."""

    def __init__(self, project_level: int):
        super().__init__()
        self.project_level = project_level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == PROJECT or record.name.startswith(PROJECT + ".")
        return record.levelno >= (self.project_level if ours else logging.ERROR)


def log_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank_{rank:05d}.log"


def setup_run_logging(run_dir: str | Path, rank: int) -> Path:
    """Route this process's logging as described above; returns its log file. Idempotent."""
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        # launch/train.py's basicConfig console handler, or a previous call's handlers; others
        # (a test harness's capture handlers) stay.
        console_stream = type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
        if getattr(h, "_mogan_ds", False) or console_stream:
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_ConsolePolicy(logging.INFO if rank == 0 else logging.WARNING))
    to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    for h in (console, to_file):
        h._mogan_ds = True
        root.addHandler(h)
    # Libraries with their own console handlers hand their records to the root instead.
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_default_handler()
        lib.enable_propagation()
    for h in list(deepspeed_logger.handlers):
        deepspeed_logger.removeHandler(h)
    deepspeed_logger.propagate = True
    # warnings.warn(...) -> the "py.warnings" logger -> the file (shown once per place).
    logging.captureWarnings(True)
    return path
