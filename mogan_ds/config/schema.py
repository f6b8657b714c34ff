"""The one typed config tree of mogan_ds: nested dataclasses, a help string and a valid range per field.

A recipe is a YAML file whose nesting mirrors these dataclasses (`config.load`); every
field carries its documentation in ``field(metadata={"help": ...})`` so that
`python -m mogan_ds info --help-keys` and error messages can show it, and its bounds
(`F(..., ge=1)`) so the range is written once (`config.validate.check_ranges`).

DeepSpeed's own settings (ZeRO stage, precision, bucket sizes) live in
``ds_configs/*.json`` and are never duplicated here; `mogan_ds.train.roles` merges the
per-role values below (optimiser, batch sizes, clipping) into that JSON.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.wan_prompts import WAN_NEGATIVE_PROMPT
from ..motion.latents import num_latent_frames


def F(  # noqa: N802 - a field constructor, named like one
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
):
    """A dataclass field with a help string and, for a number, its valid range.

    The bounds (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <) live in the field's metadata so
    the range is written once: `check_ranges` (run by `validate`, so by the loader)
    enforces it naming the key, and `field_help` shows it. For a list field the range
    applies to every entry. Mutable defaults are copied per instance.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "range": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


# The Wan DiT's attention and FFN projections (both attentions of every block): the LoRA targets
# of the public Wan LoRA trainers. Matched by peft as module-name suffixes.
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@dataclass
class LoraRoleConfig:
    """Low-rank adapters (peft LoRA) on one role's DiT: its base weights frozen, only the adapters train."""

    enabled: bool = F(
        False,
        "Train this role as a LoRA adapter on its frozen base weights (peft): only the adapters get gradients, "
        "optimizer states and EMA; the base is ZeRO-3-partitioned like the teacher and never saved. false = "
        "full fine-tuning (the paper's recipe).",
    )
    rank: int = F(64, "LoRA rank r of every adapted projection.", ge=1)
    alpha: float = F(
        64.0, "LoRA alpha: the update is W + (alpha / rank) * B A (B starts at zero, so training starts at W).", gt=0
    )
    dropout: float = F(
        0.0, "Dropout on the adapter's input (peft lora_dropout); 0 keeps the step deterministic.", ge=0, lt=1
    )
    target_modules: list[str] = F(
        WAN_LORA_TARGETS,
        "Module names (suffixes, as peft matches them) of the Linear layers that get an adapter; default the Wan "
        "attention (to_q, to_k, to_v, to_out.0 of self- and cross-attention) and FFN (ffn.net.0.proj, ffn.net.2) "
        "projections of every block. Each entry must match at least one module.",
    )


@dataclass
class FakeScoreLoraConfig(LoraRoleConfig):
    share_teacher_base: bool = F(
        True,
        "With the fake score's LoRA enabled: the fake score is an adapter on the teacher's own frozen weights, "
        "and the teacher is that module with the adapter disabled (under no_grad): one copy of the base per "
        "rank instead of two (the fake score is initialised from the teacher, so at step 0 both are the "
        "teacher). The base is built as the teacher is (ZeRO-3 partitions in models.frozen_dtype, diffusers' "
        "fp32-kept modules fp32), so models.frozen_dtype must be the DeepSpeed JSON's training precision and "
        "the fake score's ZeRO stage 3. false: the fake score keeps a frozen base of its own.",
    )


@dataclass
class LoraRolesConfig:
    generator: LoraRoleConfig = field(
        default_factory=LoraRoleConfig,
        metadata={"help": "The generator as an adapter on its (DMD-distilled) base, models.generator."},
    )
    fake_score: FakeScoreLoraConfig = field(
        default_factory=FakeScoreLoraConfig,
        metadata={"help": "The fake score (DMD critic) as an adapter on the teacher's weights."},
    )
    discriminator: LoraRoleConfig = field(
        default_factory=LoraRoleConfig,
        metadata={
            "help": "The discriminator's backbone (the teacher's first gan.disc_blocks blocks) as an adapter; its "
            "fresh prediction heads always train in full."
        },
    )


@dataclass
class ModelsConfig:
    arch: str = F(
        "auto",
        "Architecture preset (wan2.1-t2v-1.3b, tiny) used to plan a job before weights exist; 'auto' reads the folders' config.json. A folder that exists always wins.",
    )
    root: str = F(
        "",
        "Diffusers-format Wan folder (transformer/, vae/, text_encoder/, tokenizer/): the teacher, VAE and text encoder.",
    )
    generator: str = F(
        "",
        "Folder of the few-step (DMD-distilled) generator transformer in diffusers format. Empty: start from the teacher's transformer (the DMD warm-up stage).",
    )
    raft: str = F("", "Path of a torchvision RAFT state dict (.pth).")
    raft_arch: Literal["raft_large", "raft_small"] = F(
        "raft_large", "torchvision RAFT architecture the .pth belongs to."
    )
    frozen_dtype: Literal["bf16", "fp32"] = F(
        "bf16", "Precision of the frozen teacher and VAE (RAFT always runs in fp32)."
    )
    attention_backend: Literal["auto", "flash", "native"] = F(
        "auto", "Attention kernel: flash-attn when installed (auto), or torch SDPA (native)."
    )
    gradient_checkpointing: bool = F(
        True, "Activation checkpointing of the trainable DiT blocks (generator, fake score, discriminator)."
    )
    zero_init: bool = F(
        True,
        "Build each trainable network whose role's DeepSpeed config is ZeRO stage 3 under deepspeed.zero.Init and load its safetensors tensor by tensor into the partitions: a rank holds 1/world of it, never the whole model (same weights as false). false: every rank materialises the full fp32 model before deepspeed.initialize partitions it. Roles at ZeRO stage 0-2 are always built whole.",
    )
    lora: LoraRolesConfig = field(
        default_factory=LoraRolesConfig,
        metadata={
            "help": "Low-rank adapters per role (models.lora.<role>.enabled=true); off by default: full fine-tuning."
        },
    )


@dataclass
class VideoConfig:
    num_frames: int = F(49, "Pixel frames per clip (4k+1 for the Wan VAE).", ge=1)
    height: int = F(480, "Clip height in pixels (multiple of 16).", ge=16)
    width: int = F(832, "Clip width in pixels (multiple of 16).", ge=16)
    fps: float = F(16.0, "Frame rate real clips are resampled to.", gt=0)


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = F(1000, "Length of the teacher's discrete timestep grid.", ge=1)
    shift: float = F(
        8.0,
        "Wan timestep shift sigma' = s*sigma / (1 + (s-1)*sigma): shapes the DMD / fake-score timestep draw (and warps denoising_timesteps when warp_denoising_timesteps=true).",
        gt=0,
    )
    denoising_timesteps: list[int] = F(
        [1000, 757, 522],
        "The generator's distilled timesteps on the 0..1000 model grid, highest first. Used as given (sigma = t/1000) unless warp_denoising_timesteps=true.",
        gt=0,
    )
    warp_denoising_timesteps: bool = F(
        False,
        "Self-Forcing convention: treat denoising_timesteps as positions on the shift-warped grid, t' = 1000*shift_sigma(t/1000). false = CausVid/FastWan convention of the [1000, 757, 522] 3-step Wan DMD models.",
    )
    min_timestep: int = F(
        20, "Lowest timestep DMD and the fake-score loss draw (after the shift, on the 0..1000 grid).", ge=0
    )
    max_timestep: int = F(980, "Highest timestep DMD and the fake-score loss draw.", ge=1)
    teacher_steps: int = F(50, "Steps of the teacher's CFG sampler (evaluation / reference samples).", ge=1)
    teacher_shift: float = F(3.0, "Timestep shift of the teacher's multi-step sampler (3.0 for 480p Wan2.1).", gt=0)
    teacher_guidance_scale: float = F(
        5.0,
        "CFG scale of the teacher's sampler in WanPipeline's form v = v_u + g*(v_c - v_u) (Wan2.1 T2V default 5.0; 1.0 = no CFG).",
        ge=0,
    )


@dataclass
class TextConfig:
    max_length: int = F(512, "Tokens per prompt embedding (Wan: 512, zero-padded past the prompt).", ge=1)
    disc_prompt: str = F("a video with good motion", "Fixed prompt of the motion discriminator (paper, section 4.3).")
    negative_prompt: str = F(
        WAN_NEGATIVE_PROMPT,
        "The teacher's CFG negative prompt; default Wan2.1's standard one (it names static, motionless frames), '' for the empty prompt. Encoded offline by data_tools/encode_prompts.py; training checks that data.prompts was encoded with this text.",
    )


@dataclass
class DMDConfig:
    enabled: bool = F(True, "Phase 1: the DMD generator loss. false = the paper's 'w/o DMD' row.")
    weight: float = F(1.0, "lambda_DMD, weight of the DMD generator loss.", ge=0)
    guidance_scale: float = F(3.5, "Teacher CFG scale s in x0_real = cond + s*(cond - uncond).", ge=0)
    interval: int = F(1, "Run the DMD generator phase every N iterations.", ge=1)
    critic_updates: int = F(5, "Phase 2: fake-score updates per iteration (k).", ge=0)


@dataclass
class GANConfig:
    enabled: bool = F(True, "Phases 3 and 4: the motion GAN. false = the DMD-only baseline / warm-up.")
    space: Literal["flow", "latent"] = F(
        "flow", "Discriminator input: RAFT flow of decoded clips, or the video latents ('w/o optical flow')."
    )
    weight_g: float = F(1.0, "lambda_G, weight of the generator's GAN loss (value lost in the paper text).", ge=0)
    weight_d: float = F(1.0, "lambda_D, weight of the discriminator's logistic loss.", ge=0)
    r1: float = F(
        100.0,
        "lambda_R1, approximate R1 on real motion (eq. 6). The penalty lambda*(D(m)-D(m+sigma*n))^2 ~ lambda*sigma^2*|grad D|^2: its effective gradient-penalty weight is r1*sigma^2 (logged as r1_gp_weight). 0 disables it.",
        ge=0,
    )
    r2: float = F(
        100.0,
        "lambda_R2, approximate R2 on fake motion (eq. 7); effective gradient-penalty weight r2*sigma^2 (logged as r2_gp_weight). 0 disables it.",
        ge=0,
    )
    sigma: float = F(
        0.1,
        "Noise std of the approximate R1/R2 perturbation. Only lambda*sigma^2 matters to first order: the default pair (100, 0.1) is Seaweed APT's for video, effective weight 1.",
        gt=0,
    )
    interval: int = F(1, "Run the GAN phases every N iterations.", ge=1)
    window: int = F(12, "Latent chunks decoded with gradient (truncated-BPTT window).", ge=1)
    window_start: str = F(
        "random",
        "'random' (drawn per step, uniform over the starts that fit) or an integer latent-chunk index; checked by the motion path's WindowSpec.",
    )
    raft_iters: int = F(12, "RAFT flow-update iterations.", ge=1)
    flow_scale: float = F(
        20.0,
        "Motion-tensor normalisation (appendix A): the channels (u, v, |(u, v)|), in pixels at the clip's resolution, are divided by flow_scale, so motions up to flow_scale px map into [-1, 1] (magnitude into [0, 1]). Linear, no clamp or tanh, so no gradient is zeroed; scale it with the resolution.",
        gt=0,
    )
    raft_pairs_per_chunk: int = F(
        4, "Frame pairs RAFT processes at once (each chunk is activation-checkpointed).", ge=1
    )
    cache_checkpoint_every: int = F(
        1,
        "Causal-cache checkpoint interval of the chunked VAE decode and encode in the motion path: 1 saves the cache at every latent-chunk boundary for backward (the fastest); k > 1 only every k-th and recomputes the chunks in between during backward (one extra VAE forward per chunk, ~2 sqrt(T) instead of T caches at k ~ sqrt(T)); 0 = ceil(sqrt(chunks)). Outputs and gradients do not change.",
        ge=0,
    )
    vae_block_checkpoint: bool = F(
        False,
        "Checkpoint each residual block of the VAE decoder and encoder inside its (already checkpointed) latent chunk in the motion path: a chunk's recompute in backward then holds about one block's activations instead of the whole chunk's (~18.6 GiB -> a few GiB per decoder chunk at 480x832), for one more forward of the residual blocks; within each block, every norm -> nonlinearity pair is a checkpoint per frame (their fp32 backward temporaries are one frame's). Outputs do not change; gradients only at float-rounding level.",
    )
    split_over_sp: bool = F(
        True,
        "With parallel.sp_size > 1 and space=flow: each sequence-parallel rank decodes, takes the flow of and encodes only its contiguous share of the window's latent chunks, and an all-gather assembles D's input (cache gradients cross share boundaries point to point; gradients are sp=1's). Cuts the motion path's activations per rank; its backward runs serially across the SP ranks. false = every SP rank runs the whole motion path.",
    )
    disc_blocks: int = F(16, "Leading Wan DiT blocks the discriminator keeps (the rest are never built).", ge=1)
    head_blocks: list[int] = F([7, 13, 15], "Block indices whose outputs feed a prediction head.", ge=0)
    head_dim: int = F(256, "Hidden width of each prediction head's MLP.", ge=1)
    disc_batch_size: int = F(
        0,
        "Global clips per side (real and fake) per discriminator update; 0 = train.batch_size. Larger than the generator's batch, the extra fakes are fresh detached generator samples through the same window (the paper trains D with a larger batch than G). A multiple of train.micro_batch_size * dp.",
        ge=0,
    )
    disc_timestep: int = F(
        0, "Fixed diffusion timestep the discriminator's DiT runs at (value lost in the paper text).", ge=0
    )


@dataclass
class OptimConfig:
    lr: float = F(2e-6, "AdamW learning rate.", gt=0)
    betas: list[float] = F([0.0, 0.999], "AdamW betas.", ge=0, lt=1)
    weight_decay: float = F(0.01, "AdamW weight decay.", ge=0)
    eps: float = F(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = F(10.0, "Gradient-norm clip (DeepSpeed gradient_clipping); 0 disables it.", ge=0)
    warmup_steps: int = F(0, "Linear learning-rate warm-up steps (DeepSpeed WarmupLR).", ge=0)


@dataclass
class OptimizersConfig:
    generator: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Generator optimiser."})
    fake_score: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "Fake-score (DMD critic) optimiser."}
    )
    discriminator: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "Motion discriminator optimiser."}
    )
    fused_adam: bool = F(
        True,
        "On CUDA, DeepSpeed's FusedAdam (JIT-compiled at first use: needs nvcc and ninja); false = torch's AdamW, the same maths, for a machine where that build cannot run. The CPU accelerator always uses torch's.",
    )


@dataclass
class DataConfig:
    shards: str = F("", "Motion-video webdataset shards: a local path, directory, brace pattern or URL list.")
    prompts: str = F("", "Prompt-embedding shards written by data_tools/encode_prompts.py.")
    num_workers: int = F(2, "Loader worker processes per rank.", ge=0)
    shuffle_buffer: int = F(64, "webdataset shuffle buffer (samples).", ge=1)
    epoch_samples: int = F(100000, "Nominal samples per rank per epoch of the resampled stream.", ge=1)
    min_motion: float = F(0.0, "Skip corpus clips whose stored motion score is below this.", ge=0)
    shard_retries: int = F(
        3,
        "Times a shard that cannot be opened or read (vanished, I/O error: a network filesystem's hiccup) "
        "is reopened before it is skipped for this pass and counted (data_shard_errors in the metrics).",
        ge=0,
    )
    shard_retry_wait: float = F(
        1.0, "Seconds before the first reopening of a failed shard; doubled for each further one.", ge=0
    )


@dataclass
class ZeroStagesConfig:
    """Per-role ZeRO stage over the --ds_config JSON's (engines.ds_config_for applies it)."""

    generator: int = F(
        0,
        "ZeRO stage of the generator's engine; 0 = the --ds_config JSON's stage. 2 keeps the full bf16 weights "
        "on every rank (no per-layer all-gathers; one all-gather of the updated weights per optimizer step) "
        "and needs parallel.sp_size=1.",
        ge=0,
        le=3,
    )
    fake_score: int = F(0, "ZeRO stage of the fake score's engine; 0 = the JSON's stage (see generator).", ge=0, le=3)
    discriminator: int = F(
        0, "ZeRO stage of the discriminator's engine; 0 = the JSON's stage (see generator).", ge=0, le=3
    )
    teacher: int = F(
        0,
        "ZeRO stage of the frozen teacher; 0 = the JSON's stage. 3: a ZeRO-3 inference engine (no optimizer), "
        "built partitioned and loaded tensor by tensor, its parameters in models.frozen_dtype partitioned over "
        "the ZeRO group and gathered layer by layer in its forward: a rank holds 1/world of it (the 14B teacher "
        "needs this). 1 or 2: a full replica on every rank (stages 1-2 partition only gradients and optimizer "
        "states, which a frozen network does not have): no all-gathers, the whole model in memory per rank.",
        ge=0,
        le=3,
    )


@dataclass
class ParallelConfig:
    sp_size: int = F(1, "Ulysses sequence-parallel group size (divides the head count and the world size).", ge=1)
    zero_stage: ZeroStagesConfig = field(
        default_factory=ZeroStagesConfig,
        metadata={"help": "Per-role ZeRO stage (parallel.zero_stage.<role>=2); 0 keeps the DeepSpeed JSON's."},
    )
    timeout_minutes: float = F(
        30.0,
        "Process-group timeout: a collective (or barrier) waiting longer for a dead or hung rank ends the "
        "job with an error instead of hanging. Must exceed the slowest legitimate wait (a checkpoint save "
        "of the largest model to shared storage).",
        gt=0,
        le=1440,
    )


@dataclass
class TrainConfig:
    max_steps: int = F(2000, "Training iterations.", ge=1)
    batch_size: int = F(8, "Global generator batch (clips per iteration over all data-parallel ranks).", ge=1)
    micro_batch_size: int = F(
        1, "Clips per data-parallel rank per micro step; accumulation = batch / (micro * dp).", ge=1
    )
    seed: int = F(0, "Global seed (per-rank streams derive from it).", ge=0)
    deterministic: bool = F(
        False,
        "torch's deterministic algorithms (warn-only), cuDNN deterministic and its autotuner off, a fixed cuBLAS "
        "workspace: repeated and resumed runs give the same losses on a GPU too, at some speed (train/determinism.py).",
    )
    ema_decay: float = F(
        0.0,
        "Generator EMA decay: an EMA of the optimizer's fp32 master weights, exported instead of them when > 0; 0 disables the EMA.",
        ge=0,
        lt=1,
    )
    max_nonfinite: int = F(5, "Stop with an error after this many consecutive non-finite losses.", ge=1)
    shared_generator_sample: bool = F(
        False,
        "At a step where both generator updates are due (dmd.interval, gan.interval): one generator sample per "
        "micro step serves the DMD and the GAN loss, one backward of their sum and ONE generator optimizer step "
        "(false = the paper's two samples, two backward simulations and two steps). The summed gradient is clipped "
        "once (optim.generator.grad_clip), where two separate steps clip each loss's gradient on its own; the "
        "generator's Adam state, LR schedule and EMA advance once per such step, not twice. Saves one backward "
        "simulation per micro step; the sample is drawn at the DMD phase's RNG site.",
    )


@dataclass
class LoggingConfig:
    log_every: int = F(1, "Write metrics every N iterations.", ge=1)
    sample_every: int = F(500, "Write sample videos with their flow every N iterations; 0 disables.", ge=0)
    num_samples: int = F(2, "Prompts rendered at each sample interval.", ge=1)
    wandb_mode: Literal["offline", "online", "disabled"] = F(
        "offline", "wandb mode; offline unless you configure a project."
    )
    wandb_project: str = F("mogan_ds", "wandb project.")
    profile_step: int = F(
        0,
        "Profile the iteration of this metrics step with torch.profiler on rank 0: <run_dir>/logs/profile_step_<N>.txt "
        "(the operator table) and .json (each phase's time and top kernels; train/profiling.py); 0 disables. "
        "That row's times include the profiler's overhead.",
        ge=0,
    )
    profile_rows: int = F(40, "Operators listed in the profile's table and JSON.", ge=1)
    profile_trace: bool = F(
        False,
        "Also write the profiled iteration's Chrome trace (profile_step_<N>.trace.json; hundreds of MB at paper size).",
    )


@dataclass
class EvalConfig:
    every: int = F(
        0,
        "Evaluate the generator (its EMA when kept) every N iterations: fixed prompts x seeds sampled with the "
        "few-step sampler, VBench's motion metrics logged as eval_* to metrics.jsonl / wandb; 0 disables.",
        ge=0,
    )
    num_prompts: int = F(2, "Prompt embeddings (the first of data.prompts) sampled at each evaluation.", ge=1)
    seeds: list[int] = F(
        [0, 1], "Noise seeds, each with every prompt: the same videos' noise at every evaluation.", ge=0
    )
    raft: str = F(
        "",
        "RAFT weights for dynamics degree: VBench's raft-things.pth or a torchvision raft_large state dict. Empty: "
        "the training RAFT (models.raft) at VBench's 20 iterations: comparable along the run, not to VBench's numbers.",
    )
    amt: str = F("", "VBench's amt-s.pth for motion smoothness; empty: that column is n/a.")
    clip: str = F("", "CLIP ViT-L/14 folder (transformers) for aesthetic quality; empty: n/a.")
    aesthetic: str = F("", "LAION aesthetic predictor .pth (with eval.clip); empty: n/a.")
    musiq: str = F("", "MUSIQ weights for imaging quality (needs the eval-iqa extra); empty: n/a.")


@dataclass
class OutputConfig:
    run_dir: str = F("runs/mogan", "Run directory: resolved config, logs, checkpoints, samples.")
    checkpoint_every: int = F(500, "Checkpoint every N iterations.", ge=1)
    keep_checkpoints: int = F(
        2, "Complete checkpoints kept (older ones are deleted after a new one is complete).", ge=1
    )
    exit_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]] = F(
        ["SIGTERM", "SIGUSR1"],
        "Signals that stop the run cleanly: a rank that receives one finishes its iteration, all ranks "
        "agree at the boundary, save a checkpoint of that step, log the signal and the step, and "
        "launch/train.py exits with code 75 (EX_TEMPFAIL: requeue, continue with --resume; "
        "launch/slurm.sbatch requeues on it). The ranks stop the same way when their DeepSpeed launcher "
        "exits. Any of SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP; [] turns the handlers off (a signal then kills "
        "the rank at once; a launcher's exit still stops the ranks at the next boundary).",
    )
    verify_on_resume: Literal["sizes", "checksums"] = F(
        "sizes",
        "What --resume checks against the checkpoint's manifest before loading it: 'sizes' (a stat per file: "
        "finds truncated and missing files) or 'checksums' (also every file's CRC-32, read once across the "
        "ranks: finds flipped bytes; launch/train.py --verify). A damaged checkpoint is reported, marked "
        "DAMAGED and skipped for the newest intact one.",
    )


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "Weights to load."})
    video: VideoConfig = field(default_factory=VideoConfig, metadata={"help": "Clip shape."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Flow-matching schedule."})
    text: TextConfig = field(default_factory=TextConfig, metadata={"help": "Prompt embeddings."})
    dmd: DMDConfig = field(default_factory=DMDConfig, metadata={"help": "DMD regularisation (phases 1-2)."})
    gan: GANConfig = field(default_factory=GANConfig, metadata={"help": "Motion GAN (phases 3-4)."})
    optim: OptimizersConfig = field(default_factory=OptimizersConfig, metadata={"help": "Per-role optimisers."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data streams."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "Parallelism."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training loop."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Metrics and samples."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Motion metrics during training."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Run directory and checkpoints."})

    # Derived quantities -------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        """Latent frames of a clip: 1 + (F - 1) / 4 for the Wan VAE."""
        return num_latent_frames(self.video.num_frames)


_BOUND_OPS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def range_text(bounds: dict[str, float]) -> str:
    """A field's bounds as text: '>= 1', '> 0', 'in [0, 1)'."""
    lo = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    hi = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    op, bound = lo or hi
    return f"{_BOUND_OPS[op][1]} {bound}"


def field_help(cfg_cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Flat {dotted.key: help} of the whole tree, with each number's valid range and each
    literal's choices (documentation, `python -m mogan_ds info --help-keys`)."""
    out = {}
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        text = f.metadata.get("help", "")
        bounds = f.metadata.get("range")
        if bounds:
            each = " of each entry" if typing.get_origin(tp) is list else ""
            text += f" Range{each}: {range_text(bounds)}."
        if typing.get_origin(tp) is Literal:
            text += f" Choices: {', '.join(map(str, typing.get_args(tp)))}."
        out[key] = text
        if dataclasses.is_dataclass(tp):
            out.update(field_help(tp, key + "."))
    return out
