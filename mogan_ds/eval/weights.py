"""Which weights produced a number (file name + sha256 prefix, the "not given" case), and reading them safely.

Every column of an evaluation names its weights (`WeightsRef.label`) so two tables can be
compared only when they were computed by the same files. A column whose weights were not
given (or do not exist) is `None` in the JSON and "n/a (weights not given)" in print;
`MetricUnavailableError` carries the one-line reason.

The files themselves are read by `mogan_ds.models.weights_files` (weights-only, numpy's
numeric scalars allowed, a wrong file is one `BadFileError` line).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

NOT_GIVEN = "n/a (weights not given)"
SHA_PREFIX = 12

# Hashing a multi-GB folder costs seconds; a long evaluation asks for the same files often.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


class MetricUnavailableError(Exception):
    """A metric cannot be computed (its weights or its optional package are missing); the column is n/a."""


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


@dataclass(frozen=True)
class WeightsRef:
    """A weights file (or a model folder: the hash covers every file's name and content)."""

    name: str
    sha256: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:SHA_PREFIX]})"

    def to_json(self) -> dict:
        return {"file": self.name, "sha256": self.sha256[:SHA_PREFIX], "path": self.path}


def describe_weights(path: str | os.PathLike) -> WeightsRef:
    p = Path(path)
    if p.is_file():
        return WeightsRef(p.name, _file_sha256(p), str(p))
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0" + _file_sha256(f).encode())
        return WeightsRef(p.name + "/", h.hexdigest(), str(p))
    raise MetricUnavailableError(f"{p}: no such file or folder")


def require_path(path: str | os.PathLike | None, what: str, flag: str) -> Path:
    """The existing path behind `flag`, or MetricUnavailableError naming the flag and the path."""
    if path is None or str(path) == "":
        raise MetricUnavailableError(f"{what}: {NOT_GIVEN} (pass {flag})")
    p = Path(path)
    if not p.exists():
        raise MetricUnavailableError(f"{what}: {flag} {p}: no such file or folder, column is n/a")
    return p
