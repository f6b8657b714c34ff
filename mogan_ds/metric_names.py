"""Names of the scalars a training step logs: one place, so producers and readers agree.

The loss modules (`mogan_ds/losses/*.py`) put these keys into their ``(loss, logs)``
dicts, the trainer adds its own, and `train.metrics.MetricsLogger` (progress bar) and the tests
read them. A name written as a string literal in two places drifted before: the progress
bar asked for ``gan_g_loss`` / ``gan_d_loss`` while the losses logged ``g_gan_loss`` /
``d_loss``, so the bar never showed the GAN. `tests/test_metric_names.py` checks that
every name the bar reads is produced by a step.
"""

from __future__ import annotations

# (1) generator <- DMD (losses/dmd.py)
DMD_LOSS = "dmd_loss"
DMD_GRAD_NORM = "dmd_grad_norm"

# (2) fake score <- flow matching (losses/flow_matching.py)
FAKE_SCORE_LOSS = "fake_score_loss"

# (3) generator <- motion GAN (losses/gan.py g_logistic_loss; trainer)
G_GAN_LOSS = "g_gan_loss"
G_FAKE_LOGIT = "g_fake_logit"
GAN_WINDOW_START = "gan_window_start"

# (1)+(3) fused (train.shared_generator_sample): the keys of (1) and of (3), each from its own
# loss on the one shared sample, and the phase's wall time as time_generator_dmd_gan.

# (4) discriminator <- logistic + approximate R1/R2 (losses/gan.py)
D_LOSS = "d_loss"
D_LOSS_REAL = "d_loss_real"
D_LOSS_FAKE = "d_loss_fake"
D_REAL_LOGIT = "d_real_logit"
D_FAKE_LOGIT = "d_fake_logit"
D_ACCURACY = "d_accuracy"
R1_GAP = "r1_gap"
R2_GAP = "r2_gap"
R_LOSS = "r_loss"
R1_GP_WEIGHT = "r1_gp_weight"  # lambda_R1 * sigma^2: the effective gradient-penalty weight
R2_GP_WEIGHT = "r2_gp_weight"

# Added per iteration by the trainer.
TIME_PREFIX = "time_"  # + phase name: wall time of the phase
PEAK_MEM_PREFIX = "peak_mem_gib_"  # + phase name: max_memory_allocated over the phase (accelerators only)
PEAK_RESERVED_PREFIX = "peak_reserved_gib_"  # + phase name: max_memory_reserved over the phase (accelerators only)
LR_PREFIX = "lr_"  # + role: the engine's current learning rate
STEP_TIME = "step_time"
SAMPLES_PER_S = "samples_per_s"
PEAK_MEM_GIB = "peak_mem_gib"
NONFINITE_TOTAL = "nonfinite_total"
DATA_PREFIX = "data_"  # + a clip-stream counter (data.corpus.STAT_KEYS), summed over data-parallel ranks

# What the tqdm bar shows, in this order (those present in a row).
PROGRESS_BAR = (DMD_LOSS, FAKE_SCORE_LOSS, G_GAN_LOSS, D_LOSS)


def time_key(phase: str) -> str:
    return TIME_PREFIX + phase


def peak_mem_key(phase: str) -> str:
    return PEAK_MEM_PREFIX + phase


def peak_reserved_key(phase: str) -> str:
    return PEAK_RESERVED_PREFIX + phase


def data_key(counter: str) -> str:
    return DATA_PREFIX + counter


def lr_key(role: str) -> str:
    return LR_PREFIX + role
