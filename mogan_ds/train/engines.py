"""DeepSpeed engines, built per role in one place (as DeepSpeed-Chat builds actor/critic/ref).

Trainable roles — generator, fake score, discriminator — each get their own ZeRO engine
from their `roles.RolePlan`'s final DeepSpeed dict (the JSON, the role's ZeRO stage, the
recipe's optimiser, clipping and batch sizes: `roles.ds_config_for`). Every engine receives
the same topology object as `mpu`, so ZeRO partitions and reduces over the data-parallel
group while sequence-parallel peers share one replica's work.

The frozen teacher is built here too when its stage (`parallel.zero_stage.teacher`, 0 = the
JSON's) is 3: a ZeRO-3 *inference* engine, as DeepSpeed-Chat builds its reference model
(``deepspeed.initialize(model=ref, config=eval_ds_config)``, no optimizer): its parameters
stay partitioned over the same ZeRO group and are gathered layer by layer in its forward.
Its dict (`roles.teacher_ds_config`) is the JSON's ZeRO section at stage 3 with the precision of
`models.frozen_dtype`, not the JSON's training precision. At stages 0-2 (which partition only
gradients and optimizer states, none of which a frozen network has) the teacher is a plain
replicated module, as the VAE and RAFT always are: in `models.frozen_dtype`, without grads.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch

from .op_builds import prepare_op_builds
from .roles import ROLES, RolePlan


def build_teacher_engine(module: torch.nn.Module, plan: RolePlan, topo):
    """The teacher's ZeRO-3 inference engine around its partitioned build (`networks.build_networks`).

    No optimizer: DeepSpeed wraps the module in its parameter-offload hooks only (gather
    before each submodule's forward, release after). The module's parameters must already be
    ZeRO-3 partitions in their final dtypes; the engine does not re-cast them.
    """
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError("teacher: expected a frozen module (requires_grad False)")
    engine, _, _, _ = deepspeed.initialize(model=module, config=plan.ds_config, mpu=topo)
    engine.module.eval()
    return engine


@dataclass
class Engines:
    generator: object
    fake_score: object | None
    discriminator: object | None
    teacher: object | None = None  # the frozen teacher's ZeRO-3 inference engine, or None (a replica / no DMD)

    def items(self):
        """The trainable engines (the teacher is frozen: never stepped, saved or loaded)."""
        return [(r, getattr(self, r)) for r in ROLES if getattr(self, r) is not None]


def build_engine(plan: RolePlan, module: torch.nn.Module, topo):
    """A trainable role's ZeRO engine from its plan's final DeepSpeed dict."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{plan.role}: no trainable parameters")
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=plan.ds_config, mpu=topo)
    return engine


def build_engines(roles: dict[str, RolePlan], topo, nets) -> Engines:
    """One engine per trainable role in use (a disabled role gets None), and the teacher's when it is partitioned.

    `nets`: the `networks.Networks` built from the same `roles`; a partitioned teacher (its
    plan's ``partitioned``) gets its ZeRO-3 inference engine here, beside the trainable ones.
    """
    prepare_op_builds()  # FusedAdam is compiled inside deepspeed.initialize
    engines = {}
    for role in ROLES:
        module = getattr(nets, role)
        engines[role] = build_engine(roles[role], module, topo) if module is not None else None
    teacher = roles.get("teacher")
    if teacher is not None and teacher.partitioned:
        engines["teacher"] = build_teacher_engine(nets.teacher, teacher, topo)
    return Engines(**engines)


class no_param_grads:  # noqa: N801 - used as a context manager
    """Let gradients flow *through* a ZeRO-3 module without touching its parameters.

    The generator's GAN loss backpropagates through the discriminator. If D's parameters
    kept requires_grad, D's ZeRO-3 hooks would accumulate their grads during G's backward
    and D's next backward would assert in stage3.py. Only parameters that were trainable
    at `deepspeed.initialize` are toggled back on.
    """

    def __init__(self, engine):
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False
