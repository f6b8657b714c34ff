"""LoRA roles in the trainer (one process, world 1, ZeRO-3 engines on CPU; tiny recipe).

With every role a LoRA adapter and the fake score on the teacher's shared base: the first
forward of each role equals its base model's (B starts at zero); the gradient of every
adapter weight equals peft's outside DeepSpeed; the teacher is the shared base with the
adapter off, bit for bit a separately loaded frozen teacher (fp32 here, and in bf16 with
diffusers' fp32-kept modules); an update moves only adapter weights (and D's fresh heads),
which are all the engines hold optimizer states for; the EMA follows the generator's
adapters; the merged export equals base + B A * alpha / r and peft and diffusers load the
adapter folder to the same model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from mogan_ds.cli.launcher import REPO
from mogan_ds.config import load_config
from mogan_ds.models.lora import is_adapter_param

DS_CPU = str(REPO / "ds_configs" / "zero3_cpu.json")
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
RANK, ALPHA = 4, 8.0  # scaling alpha / r = 2: a factor a wrong merge would show
LORA = [
    f"models.lora.{r}.{k}={v}"
    for r in ("generator", "fake_score", "discriminator")
    for k, v in (("enabled", "true"), ("rank", RANK), ("alpha", ALPHA))
]


@pytest.fixture(scope="module")
def lt(tiny_workdir, tmp_path_factory):
    from mogan_ds.train.trainer import MoGANTrainer

    run = tmp_path_factory.mktemp("lora_run")
    cfg = load_config("tiny", [*tiny_workdir, f"output.run_dir={run}", *FAST, *LORA, "train.ema_decay=0.5"])
    return MoGANTrainer(cfg, DS_CPU)


def wan_inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(batch, 16, 2, 8, 8, generator=g),
        "timestep": torch.tensor([640.0] * batch),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "return_dict": False,
    }


def gathered(module, only=None) -> dict[str, torch.Tensor]:
    """Full values of a ZeRO-3 module's parameters (world 1: the partition is the whole tensor)."""
    return {
        n: p.ds_tensor[: p.ds_numel].view(p.ds_shape).detach().clone()
        for n, p in module.named_parameters()
        if only is None or only(n)
    }


def paths(cfg):
    from mogan_ds.checkpoint.consolidate import generator_folder
    from mogan_ds.models.builders import wan_paths

    return generator_folder(cfg), wan_paths(cfg.models.root)["transformer"]


def test_adapters_start_at_zero_so_each_role_computes_its_base(lt):
    from mogan_ds.data.prompts import load_special_embeddings
    from mogan_ds.models.builders import load_transformer
    from mogan_ds.motion.discriminator import build_discriminator

    cfg = lt.cfg
    gen_path, teacher_path = paths(cfg)
    for role, engine in lt.engines.items():
        adapters = gathered(engine.module, is_adapter_param)
        assert adapters and all(not v.any() for n, v in adapters.items() if ".lora_B." in n), role
        assert all(v.abs().sum() > 0 for n, v in adapters.items() if ".lora_A." in n), role
    x = wan_inputs()
    with torch.no_grad():
        assert torch.equal(lt.engines.generator.module(**x)[0], load_transformer(gen_path)(**x)[0])
        # the fake score is initialised from the teacher: at step 0 it computes the teacher
        assert torch.equal(lt.engines.fake_score.module(**x)[0], load_transformer(teacher_path)(**x)[0])
        torch.manual_seed(cfg.train.seed)  # as the trainer seeds D's fresh heads
        disc = load_special_embeddings(cfg.data.prompts, cfg.text.negative_prompt)["disc"]
        d_ref = build_discriminator(teacher_path, cfg.gan, disc, torch.float32, gradient_checkpointing=False)
        latents = torch.randn(2, 16, 2, 16, 16, generator=torch.Generator().manual_seed(4))
        assert torch.equal(lt.engines.discriminator.module(latents), d_ref(latents))


def test_adapter_gradients_equal_peft_outside_deepspeed(lt):
    """Adapters set to random values (A and B, masters and compute copies): the engine's gradient of every
    adapter weight equals the one of the same peft-adapted model built whole, without DeepSpeed."""
    from deepspeed.utils import safe_get_full_grad

    from mogan_ds.checkpoint.master_weights import set_local_master
    from mogan_ds.models.builders import load_transformer
    from mogan_ds.models.lora import add_lora
    from mogan_ds.sampling.samplers import transformer_velocity_fn

    engine = lt.engines.fake_score
    g = torch.Generator().manual_seed(5)
    values = {}
    for n, p in engine.module.named_parameters():
        if is_adapter_param(n):
            v = torch.randn(p.ds_shape, generator=g) * 0.1
            p.ds_tensor.data.copy_(v.view(-1))
            set_local_master(p, v.view(-1))
            values[n] = v
    ref = load_transformer(paths(lt.cfg)[1])
    add_lora(ref, lt.cfg.models.lora.fake_score, 0, "fake_score")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if is_adapter_param(n):
                p.copy_(values[n])
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(values)
    x = wan_inputs()
    args = (x["hidden_states"], x["timestep"], x["encoder_hidden_states"])
    w = torch.randn(1, 16, 2, 8, 8, generator=g)
    engine.backward((transformer_velocity_fn(engine)(*args) * w).sum())
    (transformer_velocity_fn(ref)(*args) * w).sum().backward()
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in want:
        # fp32 with another summation order (gradient checkpointing, ZeRO's buffers): equal to ~1e-7 of the scale
        scale = want[n].abs().max()
        assert scale > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5 * scale.item(), msg=n)
    engine.step()  # consume the gradient (one update of the adapters; later tests only need them non-zero)


def test_teacher_is_the_shared_base_with_the_adapter_off(lt):
    """With non-zero adapters, the teacher (the fake score's module, adapter disabled) equals a separately
    loaded frozen teacher bit for bit, and the fake score differs from it; no second copy exists."""
    from mogan_ds.models.builders import freeze, load_transformer
    from mogan_ds.models.lora import AdapterOff
    from mogan_ds.sampling.samplers import transformer_velocity_fn

    step, fake = lt.iteration, lt.engines.fake_score
    assert isinstance(lt.teacher, AdapterOff) and lt.teacher.module is fake.module and lt.engines.teacher is None
    assert not list(lt.teacher.parameters())
    replica = freeze(load_transformer(paths(lt.cfg)[1]), torch.device("cpu"))
    x = wan_inputs(2)
    args = (x["hidden_states"], torch.tensor([500.0, 757.0]), x["encoder_hidden_states"])
    with torch.no_grad():
        got, want, adapted = step.teacher_fn(*args), transformer_velocity_fn(replica)(*args), step.fake_fn(*args)
    assert want.abs().max() > 0 and torch.equal(got, want)
    assert (adapted - want).abs().max() > 1e-4
    # the adapters are on again afterwards, trainable as before, and the module back in training mode
    layers = [m for m in fake.module.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    assert layers and not any(m.disable_adapters for m in layers) and fake.module.training
    assert all(p.requires_grad for n, p in fake.module.named_parameters() if is_adapter_param(n))


def test_an_update_moves_only_adapters_and_only_they_have_optimizer_states(lt):
    it = lt.iteration
    engines = dict(lt.engines.items())
    before = {r: gathered(e.module) for r, e in engines.items()}
    it.generator_dmd_update(1)
    it.fake_score_update(1, 0)
    _, fakes, window = it.generator_gan_update(1)
    it.discriminator_update(1, fakes, window)
    for role, engine in engines.items():
        after = gathered(engine.module)
        moved = {n for n in after if not torch.equal(after[n], before[role][n])}
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        frozen = set(after) - trainable
        assert frozen and not moved & frozen, (role, sorted(moved & frozen)[:3])
        assert {n for n in trainable if ".lora_B." in n} <= moved, role
        if role == "discriminator":  # its fresh heads train in full, its backbone through adapters
            assert {n for n in trainable if not is_adapter_param(n)} == {
                n for n in after if n.startswith(("heads.", "final."))
            }
        else:
            assert all(is_adapter_param(n) for n in trainable), role
        # optimizer states (fp32 masters + two Adam moments) for the trainable parameters only
        numel = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
        masters = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
        assert numel <= masters < numel + 64 * len(trainable), role  # alignment padding at most
        assert numel < 0.2 * sum(p.ds_numel for p in engine.module.parameters()) or role == "discriminator"


def test_ema_follows_the_generators_adapters(lt):
    from mogan_ds.checkpoint.master_weights import local_master

    gen = lt.engines.generator.module
    names = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert names and all(is_adapter_param(n) for n in names)
    assert [tuple(p.shape) for p in lt.ema.params] == [tuple(p.shape) for n, p in gen.named_parameters() if n in names]
    before = [s.clone() for s in lt.ema.shadow]
    lt.iteration.generator_dmd_update(2)  # one applied step: shadow <- lerp(shadow, master, 1 - decay)
    for b, s, p in zip(before, lt.ema.shadow, lt.ema.params):
        assert torch.equal(s, b.lerp(local_master(p).float(), 1 - lt.ema.decay))
    # sampling with the EMA (in-training evaluation) swaps it into the adapters' compute partitions only
    base = gathered(gen, lambda n: not is_adapter_param(n))
    with lt.ema.compute_swapped_in():
        assert all(torch.equal(p.ds_tensor, s.view(-1)) for s, p in zip(lt.ema.shadow, lt.ema.params))
        assert all(torch.equal(v, base[n]) for n, v in gathered(gen, lambda n: not is_adapter_param(n)).items())


def test_merged_export_equals_base_plus_scaled_product_and_loads_in_peft_and_diffusers(lt):
    from diffusers import WanPipeline

    from mogan_ds.models.builders import load_transformer

    out = lt.export()  # the EMA of the adapters (this run keeps one), merged into the generator's base
    gen_path, _ = paths(lt.cfg)
    base = load_file(str(gen_path / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(out / TRANSFORMER))
    assert merged.keys() == base.keys()
    names = [n for n, p in lt.engines.generator.module.named_parameters() if p.requires_grad]
    ema = {n: s.view(p.ds_shape) for n, s, p in zip(names, lt.ema.shadow, lt.ema.params)}
    layers = {n.rsplit(".lora_", 1)[0] for n in ema}
    assert len(layers) == 4 * 10  # 4 blocks x (q, k, v, out of both attentions + the FFN's two projections)
    for key in base:
        layer = key.rsplit(".", 1)[0]
        if layer in layers and key.endswith(".weight"):
            a, b = ema[f"{layer}.lora_A.default.weight"], ema[f"{layer}.lora_B.default.weight"]
            assert b.abs().sum() > 0
            assert torch.equal(merged[key], base[key] + (b @ a) * (ALPHA / RANK)), key
        else:
            assert torch.equal(merged[key], base[key]), key
    x = wan_inputs()
    pipe = WanPipeline.from_pretrained(out)
    with torch.no_grad():
        want = pipe.transformer(**x)[0]
    # the adapter alone, in peft's format: PeftModel on the base, merged by peft, is the same model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_transformer(gen_path), str(out / "lora_adapter"))
    unloaded = peft_model.merge_and_unload()
    for k, v in unloaded.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=1e-6, atol=1e-7, msg=k)
    # and in diffusers' format: the base release's pipeline + load_lora_weights computes the merged model
    release = WanPipeline.from_pretrained(lt.cfg.models.root)
    release.transformer = load_transformer(gen_path)
    release.load_lora_weights(str(out / "lora_adapter"))
    with torch.no_grad():
        torch.testing.assert_close(release.transformer(**x)[0], want, rtol=1e-5, atol=1e-6)


def test_shared_base_in_bf16_is_the_bf16_teacher(tiny_workdir):
    """bf16 engines: the shared base is built as the teacher is (fp32-kept modules stay fp32), so the
    teacher it gives equals a frozen bf16 teacher loaded by diffusers, parameters, dtypes and output."""
    from mogan_ds.models.builders import freeze, load_transformer, wan_paths
    from mogan_ds.parallel import Topology, init_distributed
    from mogan_ds.sampling.samplers import transformer_velocity_fn
    from mogan_ds.train.engines import build_engines
    from mogan_ds.train.networks import build_networks
    from mogan_ds.train.roles import plan_roles

    init_distributed()
    topo = Topology.from_world(1)
    cfg = load_config(
        "tiny", [*tiny_workdir, *FAST, *LORA[3:6], "models.frozen_dtype=bf16", "gan.enabled=false"]
    )  # the fake score's LoRA only
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}
    roles = plan_roles(cfg, ds, topo)
    assert roles["teacher"].shared_base == "fake_score" and roles["generator"].lora is None
    nets = build_networks(cfg, topo, torch.device("cpu"), torch.zeros(1, 32, 32), roles)
    engines = build_engines(roles, topo, nets)
    assert engines.teacher is None and nets.teacher.module is engines.fake_score.module
    path = wan_paths(cfg.models.root)["transformer"]
    replica = freeze(load_transformer(path, torch.bfloat16), torch.device("cpu"))
    base = {n.replace(".base_layer.", "."): v for n, v in gathered(engines.fake_score.module).items()}
    for n, p in replica.named_parameters():
        assert base[n].dtype == p.dtype and torch.equal(base[n], p), n
    assert {p.dtype for p in replica.parameters()} == {torch.bfloat16, torch.float32}
    x = wan_inputs(2)
    args = (x["hidden_states"], torch.tensor([500.0, 757.0]), x["encoder_hidden_states"])
    with torch.no_grad():
        assert torch.equal(transformer_velocity_fn(nets.teacher)(*args), transformer_velocity_fn(replica)(*args))
