"""Parity worker for `models.zero_init`; run through the real launcher on 2 CPU ranks:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P tests/dist/zero_init_parity.py \
        --sp 1 --workdir-args args.json --run-root DIR --out result.json

In one process group it builds the tiny recipe's trainer twice, the full way
(``models.zero_init=false``: every rank materialises the models, `deepspeed.initialize`
partitions them; the frozen teacher a full replica, ``parallel.zero_stage.teacher=1``) and
partitioned from the start (``models.zero_init=true``; the teacher a ZeRO-3 inference engine,
its stage following the JSON's 3), and compares:

  weights_<role>        every parameter's consolidated fp32 master after the build
  step<k>_<loss>        the logged losses of STEPS training iterations (all four phases)
  after_<role>          the consolidated masters after those iterations
  ema                   this rank's EMA shard of the generator after them

and, on a third build of the networks alone (no engine), that a zero_init network (and the
teacher) is partitioned before any engine exists (each parameter holds only its 1/world
partition, no full data) and that the gathered-write loading path equals the direct one.
The DMD losses compare the partitioned teacher's CFG output with the replica's.
Rank 0 writes the JSON: each check's max abs difference over both ranks and the largest
reference value (a reference of zeros would make a comparison vacuous).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from deepspeed import comm as dist  # noqa: E402

from mogan_ds.config import load_config  # noqa: E402
from mogan_ds.train.roles import ds_config_for, load_ds_config  # noqa: E402
from mogan_ds.cli.launcher import REPO  # noqa: E402
from mogan_ds.checkpoint.master_weights import full_master  # noqa: E402
from mogan_ds.models.partitioned import PartitionedBuild, load_into_partitions, move_buffers  # noqa: E402

DS_CPU = REPO / "ds_configs" / "zero3_cpu.json"
STEPS = 2
LOSSES = ("dmd_loss", "fake_score_loss", "g_gan_loss", "d_loss", "r1_gap", "r2_gap")


def overrides(workdir_args: list[str], run_dir: Path, zero_init: bool, sp: int) -> list[str]:
    return [
        *workdir_args,
        f"output.run_dir={run_dir}",
        f"models.zero_init={str(zero_init).lower()}",
        # the reference keeps the teacher a replica; the partitioned side follows the JSON (stage 3)
        f"parallel.zero_stage.teacher={0 if zero_init else 1}",
        f"parallel.sp_size={sp}",
        f"train.max_steps={STEPS}",
        f"train.batch_size={2 // sp}",
        "train.ema_decay=0.9",
        "dmd.critic_updates=1",
        "logging.sample_every=0",
        "logging.wandb_mode=disabled",
        "data.num_workers=0",
    ]


def consolidated(engines) -> dict[str, dict[str, torch.Tensor]]:
    """role -> name -> full fp32 master (collective)."""
    return {role: {n: full_master(p) for n, p in e.module.named_parameters()} for role, e in engines.items()}


class Checks:
    def __init__(self):
        self.results: dict[str, dict] = {}

    def add(self, name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        diff = (got - ref).abs().max().item() if ref.numel() else 0.0
        ref_max = ref.abs().max().item() if ref.numel() else 0.0
        old = self.results.get(name, {"max_abs": 0.0, "ref_max": 0.0})
        self.results[name] = {"max_abs": max(old["max_abs"], diff), "ref_max": max(old["ref_max"], ref_max)}

    def reduced(self) -> dict:
        """Max over ranks of every check (collective; every rank has the same names in the same order)."""
        out = {}
        for name in sorted(self.results):
            t = torch.tensor([self.results[name]["max_abs"], self.results[name]["ref_max"]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[name] = {"max_abs": t[0].item(), "ref_max": t[1].item()}
        return out


def partition_facts(cfg, topo, base_ds, prompt_shape, tiny_generator: Path, checks: Checks) -> dict:
    """Networks built with zero_init before any engine: partitioned, and both loading paths agree."""
    from mogan_ds.train.networks import build_networks
    from mogan_ds.train.roles import plan_roles

    torch.manual_seed(cfg.train.seed)
    nets = build_networks(cfg, topo, torch.device("cpu"), torch.zeros(prompt_shape), plan_roles(cfg, base_ds, topo))
    world = dist.get_world_size()
    facts = {}
    facts["teacher_partitioned"] = nets.teacher_partitioned
    for role in ("generator", "fake_score", "discriminator", "teacher"):
        module = getattr(nets, role)
        params = list(module.parameters())
        facts[role] = {
            "params": len(params),
            "all_zero3": all(hasattr(p, "ds_id") for p in params),
            "no_full_data": all(p.data.numel() == 0 for p in params),
            "partition_numel": sum(p.ds_tensor.numel() for p in params),
            "full_numel": sum(p.ds_numel for p in params),
            "expected_partition_numel": sum(math.ceil(p.ds_numel / world) for p in params),
        }
    facts["teacher_bf16"] = bf16_teacher_matches_replica(cfg, topo, base_ds, checks)
    # The same generator loaded through GatheredParameters (the path for swapped / hpZ partitions).
    from diffusers import WanTransformer3DModel

    from mogan_ds.models.builders import transformer_config

    with PartitionedBuild(ds_config_for("generator", cfg, base_ds, topo), topo):
        other = WanTransformer3DModel.from_config(transformer_config(tiny_generator))
    move_buffers(other)
    counts = load_into_partitions(other, tiny_generator, force_gathered=True)
    facts["gathered_path_counts"] = counts
    for (n, a), (_, b) in zip(nets.generator.named_parameters(), other.named_parameters()):
        checks.add(f"gathered_load_{n}", a.ds_tensor, b.ds_tensor)
    return facts


def bf16_teacher_matches_replica(cfg, topo, base_ds, checks: Checks) -> dict:
    """The teacher engine at models.frozen_dtype=bf16 over both ranks: bf16 and fp32-kept partitions (ZeRO-3
    gathers them per dtype) give the bf16 replica's parameters and CFG-batched output exactly."""
    import copy

    from mogan_ds.train.engines import build_teacher_engine
    from mogan_ds.train.roles import plan_roles
    from mogan_ds.models.builders import freeze, load_transformer
    from mogan_ds.models.partitioned import load_partitioned_frozen_transformer
    from mogan_ds.sampling.samplers import transformer_velocity_fn

    cfg = copy.deepcopy(cfg)
    cfg.models.frozen_dtype = "bf16"
    path = Path(cfg.models.root) / "transformer"
    plan = plan_roles(cfg, base_ds, topo)["teacher"]
    module = load_partitioned_frozen_transformer(path, plan.ds_config, topo)
    engine = build_teacher_engine(module, plan, topo)
    replica = freeze(load_transformer(path, torch.bfloat16), torch.device("cpu"))
    partition_dtypes = sorted({str(p.ds_tensor.dtype) for p in engine.module.parameters()})
    for n, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            checks.add("teacher_bf16_param_values", p.detach().float(), replica.get_parameter(n).float())
            assert p.dtype == replica.get_parameter(n).dtype, n
    g = torch.Generator().manual_seed(5)
    tc = replica.config
    x = torch.randn(1, tc.in_channels, 2, 8, 8, generator=g)
    args = (torch.cat([x, x]), torch.tensor([500.0, 757.0]), torch.randn(2, 8, tc.text_dim, generator=g))
    with torch.no_grad():
        checks.add(
            "teacher_bf16_output",
            transformer_velocity_fn(engine.module)(*args),
            transformer_velocity_fn(replica)(*args),
        )
    return {"partition_dtypes": partition_dtypes, "world": dist.get_world_size()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--workdir-args", required=True, help="JSON list of the tiny workdir's recipe overrides")
    ap.add_argument("--run-root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mogan_ds.train.trainer import MoGANTrainer

    workdir_args = json.loads(Path(args.workdir_args).read_text())
    root = Path(args.run_root)
    trainers, weights = {}, {}
    for zero_init in (False, True):
        cfg = load_config("tiny", overrides(workdir_args, root / f"zero_init_{zero_init}", zero_init, args.sp))
        t = MoGANTrainer(cfg, DS_CPU)
        trainers[zero_init], weights[zero_init] = t, consolidated(t.engines)
    checks = Checks()
    for role, ref in weights[False].items():
        for n, v in ref.items():
            checks.add(f"weights_{role}", weights[True][role][n], v)
    del weights

    logs = {z: [t.iteration.train_step(step) for step in range(STEPS)] for z, t in trainers.items()}
    for step in range(STEPS):
        for k in LOSSES:
            checks.add(f"step{step}_{k}", torch.tensor(logs[True][step][k]), torch.tensor(logs[False][step][k]))
    after = {z: consolidated(t.engines) for z, t in trainers.items()}
    for role, ref in after[False].items():
        for n, v in ref.items():
            checks.add(f"after_{role}", after[True][role][n], v)
    for a, b in zip(trainers[True].ema.shadow, trainers[False].ema.shadow):
        checks.add("ema", a, b)

    t = trainers[True]
    # The teacher: a ZeRO-3 inference engine on the partitioned side, a plain replica on the other.
    facts_teacher = {
        str(z): {
            "engine": tr.engines.teacher is not None,
            "is_engine_module": tr.engines.teacher is not None and tr.engines.teacher.module is tr.teacher,
            "partitioned": all(hasattr(p, "ds_id") for p in tr.teacher.parameters()),
            "requires_grad": any(p.requires_grad for p in tr.teacher.parameters()),
            "saved": "teacher" in dict(tr.engines.items()),
        }
        for z, tr in trainers.items()
    }
    gen_path = Path(t.cfg.models.generator or Path(t.cfg.models.root) / "transformer")
    prompt_shape = t.engines.discriminator.module.prompt_embeds.shape
    facts = partition_facts(t.cfg, t.topo, load_ds_config(DS_CPU), prompt_shape, gen_path, checks)
    facts["sp"], facts["dp"] = t.topo.sp_size, t.topo.dp_size
    facts["teacher_engine"] = facts_teacher
    # Ulysses SP installed on the partitioned networks (the processor class of every attention).
    facts["attention_processors"] = sorted(
        {
            type(m.processor).__name__
            for e in (t.engines.generator, t.engines.discriminator)
            for m in e.module.modules()
            if hasattr(m, "processor")
        }
    )
    facts["losses"] = {str(z): [{k: r[k] for k in LOSSES} for r in rows] for z, rows in logs.items()}
    result = {"checks": checks.reduced(), "facts": facts}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
