"""Parity worker for sequence / data parallelism; run through the real launcher:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P tests/dist/sp_parity.py --sp 2 --out r.json

Every distributed result is compared with a reference computed in this same process
with no distribution at all (a deep copy of the model, run on the full input), never
only with the other rank: an error common to both ranks (e.g. gradients 1/sp too small)
is invisible to a rank-vs-rank comparison.

--sp 2 (world 2, dp 1):
  a  sp_*       SP=2 forward output, loss, input and parameter gradients (SP-averaged,
                the convention of mogan_ds.parallel.ulysses) vs the reference.
  d  chain_*    generator (SP) -> replicated nonlinearity -> discriminator-like module
                (Wan backbone sharded + heads gathering their first input) -> loss:
                gradients of both models and of the input vs the reference.
  e  motion_*   the generator GAN phase's chain with the real motion path: generator (SP) ->
                MotionPath (tiny Wan VAE decode -> raft_small -> VAE encode of the motion
                tensor) split over the SP ranks (gan.split_over_sp: each rank its share of
                the window's chunks, cache gradients sent back, D input all-gathered) ->
                discriminator-like module -> logistic generator loss: the loss, the
                generator's gradients and the input gradient vs the reference with the whole
                (unsplit) motion path in one process, i.e. what sp=1 computes.
  b  zero3_*    the SP model inside a ZeRO-3 engine (mpu=topology, zero_config_fixups,
                activation checkpointing, small buckets): full gradients gathered with
                safe_get_full_grad, the parameters after an SGD step, and the gradients
                of a second step, vs the reference.
     negative   an engine with reduce_scatter=false (no fixups): its gradient norm over
                the reference norm, reported so the test can check the parity check
                would notice a wrong reduction.
--sp 1 (world 2, dp 2):
  c  dp_*       ZeRO-3 engine, each rank its own batch, vs the reference on the mean of
                the two batches' losses.

Rank 0 writes the JSON (max abs difference of each check over both ranks, plus facts
about the groups). Config dicts for DeepSpeed are inline on purpose.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mogan_ds.models.tiny import TINY_TRANSFORMER  # noqa: E402
from mogan_ds.parallel import (  # noqa: E402
    Gather,
    ModulePlan,
    Topology,
    configure_attention,
    install_ulysses_attention,
    parallelize_module,
    parallelize_wan,
    wan_plan,
    zero_config_fixups,
)

LR = 0.05
MICRO = 2  # clips per rank
SHAPE = (16, 3, 8, 8)  # latent C, F, H, W -> 3 * 4 * 4 = 48 tokens


# --------------------------------------------------------------------------- models / data


def build_wan(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).float()
    configure_attention(model, "auto")
    return model


class Head(nn.Module):
    """Learned query cross-attends to the tokens (first positional arg), then an MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, tokens):
        kv = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.mlp(pooled.squeeze(1))


class TinyDisc(nn.Module):
    """The discriminator's contract: Wan backbone pieces called like the DiT does, heads after blocks."""

    def __init__(self, seed: int = 1):
        super().__init__()
        self.backbone = build_wan(seed, num_layers=2)
        # The DiT's output head never runs here (as in the real discriminator): no dead weights.
        self.backbone.proj_out = None
        self.backbone.scale_shift_table = None
        dim = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
        self.heads = nn.ModuleList(Head(dim, 32) for _ in range(2))
        self.final = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 1))
        self.register_buffer("prompt", torch.randn(1, 8, TINY_TRANSFORMER["text_dim"]))

    def forward(self, latents):
        bb = self.backbone
        rotary = bb.rope(latents)
        hidden = bb.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        t = torch.full((latents.shape[0],), 500.0)
        _, proj, ctx, _ = bb.condition_embedder(t, self.prompt.expand(latents.shape[0], -1, -1), None)
        proj = proj.unflatten(1, (6, -1))
        feats = []
        for block, head in zip(bb.blocks, self.heads):
            hidden = block(hidden, ctx, proj, rotary)
            feats.append(head(hidden))
        return self.final(torch.cat(feats, -1)).squeeze(-1)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(MICRO, *SHAPE, generator=g)
    t = torch.rand(MICRO, generator=g) * 1000
    text = torch.randn(MICRO, 8, TINY_TRANSFORMER["text_dim"], generator=g)
    target = torch.randn(MICRO, *SHAPE, generator=g)
    return x, t, text, target


def loss_fn(out, target):
    # Nonlinear in the output, so a wrongly scaled or misplaced gradient cannot cancel out.
    return F.mse_loss(out, target) + out.sin().mean()


def ds_config(stage3_extra: dict | None = None) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            # Partition every parameter (the tiny model's would all stay resident by default).
            "stage3_param_persistence_threshold": 0,
            # Small buckets: several gradient reductions interleave with the SP collectives
            # during backward, as they do at scale.
            "reduce_bucket_size": 4096,
            **(stage3_extra or {}),
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


# --------------------------------------------------------------------------- helpers


class Results:
    def __init__(self):
        self.checks: dict[str, dict] = {}
        self.info: dict[str, object] = {}

    def compare(self, name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        if got.shape != ref.shape:
            raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        self.checks[name] = {
            "max_abs": (got.detach().double() - ref.detach().double()).abs().max().item(),
            "ref_max": ref.detach().abs().max().item(),
        }

    def compare_many(self, name: str, got: dict, ref: dict) -> None:
        if set(got) != set(ref):
            raise AssertionError(f"{name}: parameter sets differ: {sorted(set(got) ^ set(ref))[:5]}")
        worst, worst_key, ref_max = 0.0, "", 0.0
        for k in ref:
            if ref[k] is None or got[k] is None:
                raise AssertionError(
                    f"{name}: {k} has no gradient (got {got[k] is not None}, ref {ref[k] is not None})"
                )
            d = (got[k].double() - ref[k].double()).abs().max().item()
            ref_max = max(ref_max, ref[k].abs().max().item())
            if d >= worst:
                worst, worst_key = d, k
        self.checks[name] = {"max_abs": worst, "ref_max": ref_max, "worst": worst_key, "count": len(ref)}


def sp_mean(t: torch.Tensor, topo) -> torch.Tensor:
    """Average over the SP group: the gradient convention of mogan_ds.parallel.ulysses."""
    t = t.detach().clone()
    torch.distributed.all_reduce(t, group=topo.sp_group)
    return t / topo.sp_size


def compare_grads(res: Results, name: str, model: nn.Module, ref: nn.Module, topo) -> None:
    """Every parameter's gradient of the SP model (mean over its SP group) against the reference's."""
    res.compare_many(
        name,
        {n: sp_mean(p.grad, topo) for n, p in model.named_parameters()},
        {n: p.grad for n, p in ref.named_parameters()},
    )


def record_tokens(module: nn.Module, store: dict, key: str):
    # Registered after parallelize_*: runs after the (prepended) shard hook, sees what the block gets.
    def hook(mod, args, kwargs):
        store[key] = int((args[0] if args else kwargs["hidden_states"]).shape[1])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- checks


def check_sp_autograd(topo, res: Results) -> None:
    """(a) SP=2 vs reference, plain autograd (no engine)."""
    model = build_wan()
    ref = copy.deepcopy(model)
    x, t, text, target = batch(1)

    xr = x.clone().requires_grad_()
    out_ref = ref(xr, t, text).sample
    loss_ref = loss_fn(out_ref, target)
    loss_ref.backward()

    handle = parallelize_wan(model, topo)
    res.info["sp_hooks"], res.info["sp_processors"] = handle.num_hooks, handle.num_processors
    res.info["sp_processor_backend"] = str(model.blocks[0].attn1.processor._attention_backend)
    record_tokens(model.blocks[0], res.info, "sp_block0_tokens")
    res.info["total_tokens"] = SHAPE[1] * (SHAPE[2] // 2) * (SHAPE[3] // 2)
    xs = x.clone().requires_grad_()
    out = model(xs, t, text).sample
    loss = loss_fn(out, target)
    loss.backward()

    res.compare("sp_output", out, out_ref)
    res.compare("sp_loss", loss, loss_ref)
    res.compare("sp_input_grad", sp_mean(xs.grad, topo), xr.grad)
    compare_grads(res, "sp_param_grads", model, ref, topo)


def check_chain(topo, res: Results) -> None:
    """(d) G (SP) -> replicated op -> D (SP backbone, gathered heads) -> loss."""
    G, D = build_wan(0), TinyDisc(1)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    x, t, text, _ = batch(2)

    def run(g, d, xin):
        out = g(xin, t, text).sample
        # Stands in for the replicated VAE + RAFT: nonlinear and mixing frames across the
        # token shards (the flip over the frame dim), as temporal convolutions and flow do.
        mid = torch.tanh(out) * 1.5 + 0.1 * out.flip(2) ** 2
        return F.softplus(-d(mid)).mean()

    xr = x.clone().requires_grad_()
    loss_ref = run(G_ref, D_ref, xr)
    loss_ref.backward()

    parallelize_wan(G, topo)
    install_ulysses_attention(D.backbone, topo)
    handle = parallelize_module(
        D,
        {**wan_plan(D.backbone, prefix="backbone", gather_output=False), "heads.*": ModulePlan(inputs={0: Gather(1)})},
        topo,
    )
    res.info["chain_disc_hooks"] = handle.num_hooks
    record_tokens(D.backbone.blocks[1], res.info, "chain_disc_block1_tokens")
    xs = x.clone().requires_grad_()
    loss = run(G, D, xs)
    loss.backward()

    res.compare("chain_loss", loss, loss_ref)
    res.compare("chain_input_grad", sp_mean(xs.grad, topo), xr.grad)
    compare_grads(res, "chain_generator_grads", G, G_ref, topo)
    compare_grads(res, "chain_disc_grads", D, D_ref, topo)


def check_motion_chain(topo, res: Results) -> None:
    """(e) G (SP) -> MotionPath split over the SP group -> D -> softplus(-D): vs the unsplit path."""
    from diffusers import AutoencoderKLWan

    from mogan_ds.models.builders import build_raft
    from mogan_ds.models.tiny import TINY_VAE
    from mogan_ds.motion.flow import RaftFlow
    from mogan_ds.motion.pipeline import MotionPath
    from mogan_ds.motion.window import Window, WindowSpec

    G, D = build_wan(0), TinyDisc(1)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    torch.manual_seed(3)
    vae = AutoencoderKLWan(**TINY_VAE).eval().requires_grad_(False)
    raft = RaftFlow(build_raft("raft_small"), num_iters=2, pairs_per_chunk=4)
    frames_latent = SHAPE[1]  # 3 latent chunks; the window is all of them: shares [0, 2) and [2, 3)
    spec, window = WindowSpec(frames_latent, frames_latent, 0), Window(0, frames_latent)
    x, t, text, _ = batch(3)

    def run(g, d, path, xin):
        x0 = g(xin, t, text).sample
        fake = path.fake(x0, window)
        # x1e5: through the tiny random VAE and RAFT the gradients are ~1e-6, too small for the
        # test's absolute tolerance to mean anything; a constant factor changes no comparison.
        return 1e5 * F.softplus(-d(fake.d_input)).mean(), fake

    xr = x.clone().requires_grad_()
    loss_ref, fake_ref = run(G_ref, D_ref, MotionPath(vae, raft, spec), xr)
    loss_ref.backward()

    parallelize_wan(G, topo)
    install_ulysses_attention(D.backbone, topo)
    parallelize_module(
        D,
        {**wan_plan(D.backbone, prefix="backbone", gather_output=False), "heads.*": ModulePlan(inputs={0: Gather(1)})},
        topo,
    )
    path = MotionPath(vae, raft, spec, sp=topo)
    res.info["motion_split"] = path.split is not None
    xs = x.clone().requires_grad_()
    loss, fake = run(G, D, path, xs)
    loss.backward()
    res.info[f"motion_rank{topo.sp_rank}_frames"] = int(fake.frames.shape[2])
    res.info["motion_window_frames"] = int(fake_ref.frames.shape[2])

    res.compare("motion_d_input", fake.d_input, fake_ref.d_input)
    res.compare("motion_loss", loss, loss_ref)
    res.compare("motion_input_grad", sp_mean(xs.grad, topo), xr.grad)
    compare_grads(res, "motion_generator_grads", G, G_ref, topo)


def _engine(model, topo, config):
    import deepspeed

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, mpu=topo)
    return engine


def _full_grads(engine) -> dict:
    from deepspeed.utils import safe_get_full_grad

    # Collective: every rank walks the parameters in the same order.
    return {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}


def _full_params(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _ref_step(ref, batches) -> tuple[dict, torch.Tensor]:
    """Reference gradients on the mean of the batches' losses (no distribution)."""
    ref.zero_grad(set_to_none=True)
    xs = [b[0].clone().requires_grad_() for b in batches]
    losses = [loss_fn(ref(xi, b[1], b[2]).sample, b[3]) for xi, b in zip(xs, batches)]
    torch.stack(losses).mean().backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}, xs


def _sgd(ref, grads):
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p -= LR * grads[n]


def check_zero3(topo, res: Results, prefix: str) -> None:
    """(b) at sp>1 / (c) at sp=1: a ZeRO-3 engine over the topology vs the reference."""
    model = build_wan()
    ref = copy.deepcopy(model)
    model.enable_gradient_checkpointing()
    parallelize_wan(model, topo)  # no-op at sp=1
    engine = _engine(model, topo, zero_config_fixups(ds_config(), topo))
    res.info[f"{prefix}_train_batch_size"] = engine.train_batch_size()
    res.info[f"{prefix}_partition_count"] = int(engine.optimizer.partition_count)  # ranks sharing one parameter
    res.info[f"{prefix}_reduce_scatter"] = engine.zero_reduce_scatter()

    # Each DP replica its own clips; SP peers the same ones.
    all_batches = [[batch(100 * step + r) for r in range(topo.dp_size)] for step in (1, 2)]
    for step, batches in enumerate(all_batches, start=1):
        x, t, text, target = batches[topo.dp_rank]
        xs = x.clone().requires_grad_()
        loss = loss_fn(engine(xs, t, text).sample, target)
        engine.backward(loss)
        got = _full_grads(engine)
        ref_grads, ref_x = _ref_step(ref, batches)
        res.compare_many(f"{prefix}_grads_step{step}", got, ref_grads)
        # Input gradient of this rank's clips: mean over the SP group (ZeRO does not touch inputs).
        # The reference's input gradient is of the mean over dp batches, hence the dp factor.
        res.compare(f"{prefix}_input_grad_step{step}", sp_mean(xs.grad, topo), ref_x[topo.dp_rank].grad * topo.dp_size)
        engine.step()
        _sgd(ref, ref_grads)
        res.compare_many(f"{prefix}_params_after_step{step}", _full_params(engine), dict(ref.named_parameters()))


def negative_control(topo, res: Results) -> None:
    """reduce_scatter=false without the fixups: DeepSpeed sums over SP; report the factor."""
    model = build_wan()
    ref = copy.deepcopy(model)
    parallelize_wan(model, topo)
    cfg = ds_config({"reduce_scatter": False, "reduce_bucket_size": 10**8})  # all buckets on the contiguous path
    engine = _engine(model, topo, cfg)
    x, t, text, target = batch(7)
    engine.backward(loss_fn(engine(x, t, text).sample, target))
    got = _full_grads(engine)
    ref_grads, _ = _ref_step(ref, [batch(7)])
    num = sum(g.double().pow(2).sum() for g in got.values()).sqrt()
    den = sum(g.double().pow(2).sum() for g in ref_grads.values()).sqrt()
    res.info["negative_reduce_scatter_false_grad_ratio"] = (num / den).item()


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args()
    torch.set_num_threads(1)  # two ranks on two cores

    t0 = time.time()
    topo = Topology.from_world(args.sp)
    res = Results()
    res.info.update(world=topo.world_size, sp=topo.sp_size, dp=topo.dp_size, backend=torch.distributed.get_backend())
    res.info["mpu"] = {
        "data_parallel_world_size": topo.get_data_parallel_world_size(),
        "data_parallel_group_size": torch.distributed.get_world_size(topo.get_data_parallel_group()),
        "sequence_parallel_group_size": torch.distributed.get_world_size(topo.get_sequence_parallel_group()),
        "model_parallel_group_size": torch.distributed.get_world_size(topo.get_model_parallel_group()),
    }
    if topo.sp_size > 1:
        check_sp_autograd(topo, res)
        check_chain(topo, res)
        check_motion_chain(topo, res)
        check_zero3(topo, res, "zero3")
        negative_control(topo, res)
    else:
        check_zero3(topo, res, "dp")
    res.info["seconds"] = round(time.time() - t0, 1)

    gathered = [None] * topo.world_size
    torch.distributed.all_gather_object(gathered, {"checks": res.checks, "info": res.info, "rank": topo.rank})
    if topo.rank == 0:
        merged = {"checks": {}, "info": gathered[0]["info"], "per_rank_info": [g["info"] for g in gathered]}
        for name in res.checks:
            per_rank = [g["checks"][name] for g in gathered]
            worst = max(per_rank, key=lambda c: c["max_abs"])
            merged["checks"][name] = dict(worst, per_rank_max_abs=[c["max_abs"] for c in per_rank])
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=2)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
