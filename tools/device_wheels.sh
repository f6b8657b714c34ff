#!/usr/bin/env bash
# Fetch the wheels the GPU machine's image lacks (tools/device_wheels.txt) for CPython 3.12 on
# manylinux x86-64 into a git-ignored folder, check that every carried wheel's requirements are
# on the image or carried too, and print their sizes and what travels in all.
#
#   bash tools/device_wheels.sh [DEST]        # DEST defaults to .whl (ignored by .gitignore)
#   PYTHON=/path/to/python bash tools/device_wheels.sh
#
# The python used needs pip, and torch + setuptools for DeepSpeed's build (its setup.py imports
# torch); the project's own environment has both. DeepSpeed is published as an sdist only: its
# wheel is built here with DS_BUILD_OPS=0 (no op compiled; FusedAdam is JIT-compiled on the GPU
# machine at first use, with the nvcc and ninja of its image). The wheel is py3-none-any, so the
# python building it need not be 3.12. Pinned versions, no pip cache: the same list gives the
# same wheels. On the GPU machine (benchmarks/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${1:-.whl}
LIST=tools/device_wheels.txt
IMAGE=tools/device_image_packages.txt
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# What may travel to the GPU machine in all: the working tree plus the carried wheels.
LIMIT_MIB=64

TMP="$DEST.partial"
rm -rf "$TMP"
mkdir -p "$TMP"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

grep -Ev '^[[:space:]]*(#|$)' "$LIST" | while read -r kind spec _; do
    case "$kind" in
        wheel)
            echo "download $spec"
            "$PYTHON" -m pip download --quiet --no-cache-dir --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp "${PLATFORMS[@]}" -d "$TMP" "$spec"
            ;;
        build)
            echo "build    $spec (DS_BUILD_OPS=0: ops compiled on first use)"
            # SOURCE_DATE_EPOCH: fixed timestamps inside the built wheel.
            DS_BUILD_OPS=0 SOURCE_DATE_EPOCH=1700000000 "$PYTHON" -m pip wheel --quiet --no-cache-dir --no-deps \
                --no-build-isolation --no-binary "${spec%%==*}" -w "$TMP" "$spec" >"$TMP/.build.log" 2>&1 ||
                { cat "$TMP/.build.log"; exit 1; }
            rm -f "$TMP/.build.log"
            ;;
        skip) ;;
        *)
            echo "$LIST: unknown kind '$kind' (wheel, build, skip)" >&2
            exit 1
            ;;
    esac
done

# Recompress every wheel with LZMA (zip method 14; pip reads it through zipfile, and the RECORD
# hashes are of the uncompressed files, so they still hold): 45 MiB of deflated wheels become
# ~34 (av's FFmpeg libraries 34 -> 25.5), which is what lets them travel beside the tree.
"$PYTHON" - "$TMP" <<'EOF'
import os, sys, zipfile
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    tmp = whl.with_suffix(".lzma")
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zo:
        for info in zi.infolist():  # the same names, order and timestamps: deterministic
            zo.writestr(info, zi.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, whl)
EOF

# Every wheel's requirements (markers evaluated for CPython 3.12 on Linux x86-64, extras left
# out) must be on the image, carried, or deliberately skipped in the list.
"$PYTHON" - "$TMP" "$LIST" "$IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

dest, listing, image = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
known = {norm(l.strip()) for l in open(image) if l.strip() and not l.startswith("#")}
for line in open(listing):
    f = line.split("#")[0].split()
    if f:
        known.add(norm(f[1].split("==")[0]))
missing = []
for whl in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for text in z.read(meta).decode().splitlines():
            if not text.startswith("Requires-Dist:"):
                continue
            req = Requirement(text.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm(req.name) not in known:
                missing.append(f"{whl.name} needs {req}")
if missing:
    sys.exit("requirements neither on the image nor in " + listing + ":\n  " + "\n  ".join(missing))
EOF

rm -rf "$DEST"
mv "$TMP" "$DEST"
echo
echo "wheels in $DEST:"
# shellcheck disable=SC2012
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF; s += $5} END {printf "  %8.2f MiB  total\n", s / 1048576}'
wheels=$(cat "$DEST"/*.whl | wc -c)
# What travels besides: tracked files and untracked files git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
    total = (w + t) / 1048576
    printf "  %8.2f MiB  working tree (tracked + untracked not ignored)\n  %8.2f MiB  travels in all, of %d MiB\n", t / 1048576, total, l
    if (total > l) { print "too large to travel: carry fewer wheels or shrink the tree" > "/dev/stderr"; exit 1 }
}'
