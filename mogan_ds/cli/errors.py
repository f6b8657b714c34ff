"""What every command-line entry point shares: user errors become one line and exit code 2.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        with user_errors(args.debug, "sample.py") as outcome:
            run(args)
        return outcome.exit_code

An expected mistake (a bad setting, a missing or malformed file, missing weights, a run
directory that would be overwritten) is printed as ``<prog>: error: <message>`` on one
stderr line and the exit code becomes 2, the code argparse uses for bad usage. Anything
else is a bug and keeps its traceback. With ``--debug`` (`add_debug_flag`) user errors
propagate with their traceback too.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError

USAGE_EXIT_CODE = 2

# Exit codes of launch/train.py beyond 0, 1 and 2, from sysexits.h (docs/checkpoints.md, "Guarantees");
# launch/slurm.sbatch requeues the job on EXIT_REQUEUE.
EXIT_STORAGE = 74  # EX_IOERR: a checkpoint could not be written (disk full, I/O error, permission)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; run again with --resume

# FileNotFoundError covers models.builders.MissingWeightsError; FileExistsError the
# trainer's refusal to overwrite a run directory. These OSErrors come from a path the
# user named; other OSErrors (disk full, I/O errors) are not input mistakes and keep
# their traceback.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of input errors")


def add_generation_tail(parser: argparse.ArgumentParser) -> None:
    """The arguments `launch/sample.py` and `launch/evaluate.py` end with: the VAE's dtype, --debug, overrides."""
    parser.add_argument("--vae-dtype", dest="vae_dtype", choices=["bf16", "fp32"], default="fp32")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def default_device() -> str:
    """This rank's CUDA device (LOCAL_RANK, set by the deepspeed launcher; 0 otherwise), else the CPU."""
    import os

    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a message may quote a multi-line value)."""
    return " ".join((str(e) or type(e).__name__).split())


class user_errors:  # noqa: N801 - used as a context manager
    """Catch an expected user error: print it as one line, set ``exit_code`` to 2.

    The exception is swallowed (execution continues after the ``with`` block) unless
    `debug` is set, in which case it propagates unchanged.
    """

    def __init__(self, debug: bool = False, prog: str = "mogan_ds"):
        self.debug, self.prog = debug, prog
        self.exit_code = 0
        self.message: str | None = None

    def __enter__(self) -> user_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or self.debug or not isinstance(exc, USER_ERROR_TYPES):
            return False
        self.message = one_line(exc)
        self.exit_code = USAGE_EXIT_CODE
        print(f"{self.prog}: error: {self.message}", file=sys.stderr, flush=True)
        return True
