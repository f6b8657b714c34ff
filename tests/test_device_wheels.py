"""The wheels that travel to the GPU machine cover setup.cfg: a new dependency fails here, not there.

setup.cfg's install_requires must each be on the GPU image (tools/device_image_packages.txt),
carried as a wheel (tools/device_wheels.txt: `wheel`/`build`), or deliberately not carried
(`skip`, with its reason). tools/device_wheels.sh then checks each carried wheel's own
requirements against the same lists when it fetches them.
"""

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_requires() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def image_packages() -> set[str]:
    text = (REPO / "tools" / "device_image_packages.txt").read_text()
    return {norm(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")}


def wheel_list() -> list[tuple[str, str, str | None, str]]:
    """(kind, name, pinned version or None, reason) per entry of tools/device_wheels.txt."""
    out = []
    for line in (REPO / "tools" / "device_wheels.txt").read_text().splitlines():
        body, _, reason = line.partition("#")
        fields = body.split()
        if not fields:
            continue
        assert len(fields) == 2, f"expected 'KIND NAME[==VERSION]': {line!r}"
        kind, spec = fields
        name, _, version = spec.partition("==")
        out.append((kind, norm(name), version or None, reason.strip()))
    return out


def test_install_requires_are_on_the_image_carried_or_deliberately_skipped():
    image = image_packages()
    listed = {name: kind for kind, name, _, _ in wheel_list()}
    uncovered = [str(r) for r in install_requires() if norm(r.name) not in image and norm(r.name) not in listed]
    assert not uncovered, (
        f"setup.cfg needs {uncovered}, which the GPU image lacks: add each to tools/device_wheels.txt "
        "('wheel NAME==VERSION' to carry it, or 'skip NAME  # why the GPU check does not need it')"
    )


def test_wheel_list_is_well_formed_and_pinned_as_setup_cfg_pins():
    entries = wheel_list()
    names = [name for _, name, _, _ in entries]
    assert len(names) == len(set(names)), "a package listed twice"
    pins = {norm(r.name): str(r.specifier) for r in install_requires()}
    for kind, name, version, reason in entries:
        assert kind in ("wheel", "build", "skip"), kind
        if kind == "skip":
            assert version is None and reason, f"skip {name}: no version, and a reason in a comment"
            continue
        assert version, f"{kind} {name}: pin a version (the same list must give the same wheels)"
        if pins.get(name, "").startswith("=="):
            assert pins[name] == f"=={version}", f"{name}: setup.cfg pins {pins[name]}, the wheel list {version}"
    # DeepSpeed has no wheel on PyPI: it is built here, its ops left to the JIT.
    assert ("build", "deepspeed") in {(k, n) for k, n, _, _ in entries}


def test_carried_packages_are_not_already_on_the_image():
    """The image's own copy would do (the wheels' size is what limits what travels), except where the
    entry says why another version is needed."""
    image = image_packages()
    for kind, name, _, reason in wheel_list():
        if kind != "skip" and name in image:
            assert "version" in reason, f"{name} is on the image; say why it is carried anyway"
