"""LoRA post-training (`models.lora.<role>`): the config and each role's plan.

Config: off by default (the paper recipe unchanged), typed and range-checked keys, and the
build decisions `roles.plan_roles` makes for a LoRA role (ZeRO-3 only; the fake score on the
teacher's shared base, whose teacher plan then has no engine of its own).
"""

from __future__ import annotations

import pytest

from mogan_ds.config import WAN_LORA_TARGETS, Config, ConfigError, field_help, load_config
from mogan_ds.plan.comm import PlanTopology
from mogan_ds.train.roles import plan_roles

ROLES = ("generator", "fake_score", "discriminator")
ZERO3 = {"zero_optimization": {"stage": 3}}
ZERO3_BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}


def lora_on(*roles, rank=4, alpha=8.0):
    out = []
    for r in roles:
        out += [f"models.lora.{r}.enabled=true", f"models.lora.{r}.rank={rank}", f"models.lora.{r}.alpha={alpha}"]
    return out


def test_off_by_default_and_documented():
    cfg = Config()
    for role in ROLES:
        lora = getattr(cfg.models.lora, role)
        assert not lora.enabled and lora.target_modules == WAN_LORA_TARGETS
    assert cfg.models.lora.fake_score.share_teacher_base
    for name in ("tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):  # the shipped recipes train in full
        assert not any(getattr(load_config(name).models.lora, r).enabled for r in ROLES)
    helps = field_help(Config)
    assert "Range: >= 1." in helps["models.lora.generator.rank"]
    assert "Range: in [0, 1)." in helps["models.lora.discriminator.dropout"]
    assert "teacher" in helps["models.lora.fake_score.share_teacher_base"]
    plans = plan_roles(load_config("tiny"), ZERO3, PlanTopology(2, 1))
    assert all(p.lora is None and p.shared_base is None for p in plans.values())


@pytest.mark.parametrize(
    "override, key",
    [
        ("models.lora.generator.rank=0", "models.lora.generator.rank"),
        ("models.lora.fake_score.alpha=0", "models.lora.fake_score.alpha"),
        ("models.lora.discriminator.dropout=1.0", "models.lora.discriminator.dropout"),
        ("models.lora.generator.target_modules=[]", "models.lora.generator.target_modules"),
        ("models.lora.generator.target_modules=[to_q, to_q]", "models.lora.generator.target_modules"),
        ("models.lora.fake_score.enabled=maybe", "models.lora.fake_score.enabled"),
    ],
)
def test_bad_lora_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


def test_role_plans_of_lora_roles():
    cfg = load_config("tiny", lora_on(*ROLES))
    plans = plan_roles(cfg, ZERO3, PlanTopology(2, 1))
    for role in ROLES:
        p = plans[role]
        assert p.trainable and p.stage == 3 and p.partitioned and p.lora is getattr(cfg.models.lora, role)
    # The fake score sits on the teacher's weights; the teacher is that base, with no engine or build of its own.
    assert plans["fake_score"].shared_base == "teacher"
    t = plans["teacher"]
    assert t.shared_base == "fake_score" and t.ds_config is None and not t.partitioned and not t.trainable
    # Not shared: the teacher is its own ZeRO-3 inference engine again, the fake score has its own base.
    cfg2 = load_config("tiny", [*lora_on("fake_score"), "models.lora.fake_score.share_teacher_base=false"])
    plans = plan_roles(cfg2, ZERO3, PlanTopology(2, 1))
    assert plans["fake_score"].shared_base is None and plans["teacher"].partitioned and plans["teacher"].ds_config
    assert plans["generator"].lora is None
    # A shared base is built partitioned whatever models.zero_init says (it is the teacher's build).
    cfg3 = load_config("tiny", [*lora_on("generator", "fake_score"), "models.zero_init=false"])
    plans = plan_roles(cfg3, ZERO3, PlanTopology(2, 1))
    assert plans["fake_score"].partitioned and not plans["generator"].partitioned


def test_lora_needs_zero3_and_a_shared_base_the_teachers_precision():
    cfg = load_config("tiny", [*lora_on("generator"), "parallel.zero_stage.generator=2"])
    with pytest.raises(ConfigError, match=r"models\.lora\.generator\.enabled with ZeRO stage 2"):
        plan_roles(cfg, ZERO3, PlanTopology(2, 1))
    # tiny's frozen_dtype is fp32: a bf16 JSON would train the shared base at another precision than the teacher's
    cfg = load_config("tiny", lora_on("fake_score"))
    with pytest.raises(ConfigError, match=r"share_teacher_base with models\.frozen_dtype=fp32"):
        plan_roles(cfg, ZERO3_BF16, PlanTopology(2, 1))
    ok = load_config("tiny", [*lora_on("fake_score"), "models.frozen_dtype=bf16"])
    assert plan_roles(ok, ZERO3_BF16, PlanTopology(2, 1))["teacher"].shared_base == "fake_score"
    unshared = load_config("tiny", [*lora_on("fake_score"), "models.lora.fake_score.share_teacher_base=false"])
    assert plan_roles(unshared, ZERO3_BF16, PlanTopology(2, 1))["fake_score"].shared_base is None
