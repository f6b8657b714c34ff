import dataclasses
import typing

import pytest

from mogan_ds.config import Config, ConfigError, check_ranges, field_help, load_config, range_text, validate


def test_shipped_recipes_load_and_match_the_paper():
    tiny = load_config("tiny")
    wan = load_config("wan2.1-t2v-1.3b")
    assert tiny.video.height >= 128 and tiny.video.width >= 128  # RAFT's minimum
    assert (wan.video.num_frames, wan.video.height, wan.video.width) == (49, 480, 832)
    assert wan.latent_frames == 13
    assert wan.schedule.denoising_timesteps == [1000, 757, 522] and wan.schedule.shift == 8.0
    assert wan.gan.disc_blocks == 16 and wan.gan.head_blocks == [7, 13, 15]
    # APT's video pair for approximate R1/R2: effective gradient-penalty weight lambda * sigma^2 = 1.
    assert wan.gan.r1 * wan.gan.sigma**2 == pytest.approx(1.0) and wan.gan.r2 * wan.gan.sigma**2 == pytest.approx(1.0)
    # "12 latent chunks corresponding to 49 frames": the window decodes exactly 49 frames.
    from mogan_ds.motion.window import WindowSpec

    assert WindowSpec.from_config(wan.gan, wan.latent_frames).draw().frames == (0, 49)
    assert wan.gan.disc_batch_size in (0, wan.train.batch_size) or wan.gan.disc_batch_size > wan.train.batch_size


def test_overrides_are_typed():
    cfg = load_config("tiny", ["gan.window=1", "dmd.enabled=false", "optim.generator.lr=3e-5", "gan.head_blocks=[1,2]"])
    assert cfg.gan.window == 1 and cfg.dmd.enabled is False
    assert cfg.optim.generator.lr == pytest.approx(3e-5)
    assert cfg.gan.head_blocks == [1, 2]


@pytest.mark.parametrize(
    "override, key",
    [
        ("gan.windw=3", "gan.windw"),
        ("nonsense=1", "nonsense"),
        ("optim.generator.lrr=1", "optim.generator.lrr"),
        ("gan.window=three", "gan.window"),
        ("dmd.enabled=maybe", "dmd.enabled"),
        ("gan.space=pixels", "gan.space"),
        ("video.num_frames=10", "video.num_frames"),
        ("video.height=64", "video.height"),  # RAFT needs >= 128 in flow space
        ("gan.head_blocks=[0,5]", "gan.head_blocks"),
        ("gan.head_blocks=[0,1]", "gan.head_blocks"),
        ("gan.window=99", "gan.window"),
        ("train.micro_batch_size=4", "train.batch_size"),
        ("schedule.denoising_timesteps=[522,757,1000]", "schedule.denoising_timesteps"),
        ("gan.window_start=first", "gan.window_start"),
        # ranges declared in the tree (issue 9: these were accepted or ended in a traceback)
        ("models.arch=foo", "models.arch"),
        ("text.max_length=-1", "text.max_length"),
        ("train.batch_size=-8", "train.batch_size"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer"),  # 0 would fill the buffer forever
        ("data.num_workers=-1", "data.num_workers"),
        ("data.epoch_samples=0", "data.epoch_samples"),
        ("dmd.critic_updates=-1", "dmd.critic_updates"),
        ("optim.generator.warmup_steps=-5", "optim.generator.warmup_steps"),
        ("optim.fake_score.betas=[0.9,1.5]", "optim.fake_score.betas[1]"),
        ("optim.discriminator.betas=[0.9]", "optim.discriminator.betas"),
        ("optim.generator.lr=.nan", "optim.generator.lr"),
        ("optim.generator.grad_clip=.inf", "optim.generator.grad_clip"),
        ("schedule.teacher_steps=0", "schedule.teacher_steps"),
        ("schedule.denoising_timesteps=[1000,0]", "schedule.denoising_timesteps[1]"),
        ("logging.log_every=0", "logging.log_every"),
        ("logging.sample_every=-1", "logging.sample_every"),
        ("gan.head_dim=0", "gan.head_dim"),
        ("gan.sigma=0", "gan.sigma"),
        ("gan.disc_timestep=1001", "gan.disc_timestep"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("output.keep_checkpoints=0", "output.keep_checkpoints"),
        ("gan..window=3", "gan..window"),
    ],
)
def test_bad_input_names_the_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", [override])
    assert key in str(ei.value)


def test_impossible_parallel_layout_names_the_key():
    cfg = load_config("tiny", ["parallel.sp_size=3", "gan.split_over_sp=false"])
    with pytest.raises(ConfigError, match="parallel.sp_size"):
        validate(cfg, num_heads=4)
    cfg = load_config("tiny", ["parallel.sp_size=2"])
    validate(cfg, num_heads=4, world_size=2)
    with pytest.raises(ConfigError, match="parallel.sp_size"):
        validate(cfg, num_heads=4, world_size=3)


def test_a_window_shorter_than_the_sp_group_is_refused_by_the_config_alone():
    """The SP split of the motion path needs a chunk per SP rank: refused at load, before any weight is read."""
    with pytest.raises(ConfigError, match=r"gan.window: a window of 2 latent chunks .* parallel.sp_size=4"):
        load_config("tiny", ["gan.window=2", "parallel.sp_size=4"])
    load_config("tiny", ["gan.window=2", "parallel.sp_size=2"])
    load_config("tiny", ["gan.window=2", "parallel.sp_size=4", "gan.split_over_sp=false"])
    load_config("tiny", ["gan.window=2", "parallel.sp_size=4", "gan.space=latent"])
    load_config("tiny", ["gan.window=2", "parallel.sp_size=4", "gan.enabled=false"])


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="no_such_recipe"):
        load_config("no_such_recipe")


def test_every_field_is_documented():
    helps = field_help(Config)
    undocumented = [k for k, v in helps.items() if not v.strip()]
    assert not undocumented, undocumented

    # and every leaf of a default config is reachable as a documented key
    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from leaves(v, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    assert set(leaves(Config())) <= set(helps)


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def test_every_numeric_field_declares_its_range_and_shows_it():
    helps = field_help(Config)
    numeric = [
        (k, f) for k, f, tp in _leaves(Config) if tp in (int, float) or typing.get_args(tp) in ((int,), (float,))
    ]
    assert len(numeric) > 40
    missing = [k for k, f in numeric if not f.metadata.get("range")]
    assert not missing, f"numeric fields without a range: {missing}"
    for k, f in numeric:
        assert range_text(f.metadata["range"]) in helps[k], k
    assert helps["train.ema_decay"].endswith("Range: in [0, 1).")
    assert "Range of each entry: in [0, 1)." in helps["optim.generator.betas"]
    assert "Choices: flow, latent." in helps["gan.space"]


def test_defaults_and_shipped_recipes_are_in_range():
    check_ranges(Config())
    for name in ("tiny", "wan2.1-t2v-1.3b"):
        check_ranges(load_config(name))


def test_range_check_applies_to_programmatic_configs_too():
    cfg = load_config("tiny")
    cfg.logging.log_every = 0
    with pytest.raises(ConfigError, match=r"logging.log_every: 0 is out of range; must be >= 1"):
        validate(cfg)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("gan: [1\n", "not valid YAML (line 2"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("gan: 3\n", "gan: expected a mapping"),
    ],
)
def test_bad_recipe_files_name_the_file(tmp_path, text, message):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert message in str(ei.value)
    assert "gan:" in message or str(p) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_binary_recipe_is_a_config_error(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(p)


def test_architecture_limits_are_checked_when_known():
    cfg = load_config("tiny", ["gan.disc_blocks=6", "gan.head_blocks=[5]"])
    validate(cfg, num_heads=4)
    with pytest.raises(ConfigError, match="gan.disc_blocks: 6 blocks asked of a DiT that has 4"):
        validate(cfg, num_heads=4, num_layers=4)
    validate(load_config("tiny", ["gan.enabled=false", "gan.disc_blocks=6", "gan.head_blocks=[5]"]), num_layers=4)
