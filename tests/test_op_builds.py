"""DeepSpeed's JIT op builds under a CUDA image's TORCH_CUDA_ARCH_LIST (train/op_builds.py)."""

from __future__ import annotations

import pytest

from mogan_ds.train.op_builds import ARCH_LIST, deepspeed_arch_list


@pytest.mark.parametrize(
    "value, expected",
    [
        ("9.0a", "9.0"),
        ("8.0;9.0a", "8.0;9.0"),
        ("8.0 9.0a+PTX 10.0f", "8.0;9.0+PTX;10.0"),
        ("9.0;9.0a", "9.0"),
    ],
)
def test_arch_specific_entries_become_plain(value, expected):
    env = {ARCH_LIST: value}
    note = deepspeed_arch_list(env)
    assert env[ARCH_LIST] == expected
    assert value in note and expected in note


@pytest.mark.parametrize("env", [{}, {ARCH_LIST: ""}, {ARCH_LIST: "8.0;9.0+PTX"}, {ARCH_LIST: "9.0 10.0"}])
def test_plain_or_unset_lists_are_left_alone(env):
    before = dict(env)
    assert deepspeed_arch_list(env) is None
    assert env == before


def test_deepspeed_builder_parses_the_rewritten_list(monkeypatch):
    """DeepSpeed's own parser (FusedAdam's JIT arch flags) fails on '9.0a', as on the H200 image, and takes the rewrite."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv(ARCH_LIST, "8.0;9.0a")
    with pytest.raises(ValueError, match="'0a'"):
        builder.compute_capability_args()
    assert deepspeed_arch_list() is not None
    builder.compute_capability_args()
    import os

    assert os.environ[ARCH_LIST].split(";") == ["8.0", "9.0+PTX"]


def test_engines_are_built_after_the_list_is_made_parseable(monkeypatch):
    """build_engines rewrites the list before any deepspeed.initialize (which builds FusedAdam on CUDA)."""
    from types import SimpleNamespace

    from mogan_ds.train.engines import build_engines

    monkeypatch.setenv(ARCH_LIST, "9.0a")
    build_engines({}, None, SimpleNamespace(generator=None, fake_score=None, discriminator=None))
    import os

    assert os.environ[ARCH_LIST] == "9.0"
