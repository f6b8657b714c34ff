"""Completion records: the JSON a folder's writer puts down last, read back to skip work already done.

A writer (prompt embeddings, the synthetic corpus) records the inputs that made the folder
under one key of that file; the same inputs again find the folder complete and return its
record instead of redoing the work, other inputs (or ``overwrite``) redo it.
"""

from __future__ import annotations

import json
import os


def completed_record(path: str | os.PathLike, key: str, inputs: dict, overwrite: bool = False) -> dict | None:
    """The record at `path` when it exists, `overwrite` is off and its `key` equals `inputs`; else None."""
    if overwrite or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    return record if record.get(key) == inputs else None
