import dataclasses

import pytest

from mogan_ds.config import Config, ConfigError, field_help, load_config, validate


def test_shipped_recipes_load_and_match_the_paper():
    tiny = load_config("tiny")
    wan = load_config("wan2.1-t2v-1.3b")
    assert tiny.video.height >= 128 and tiny.video.width >= 128  # RAFT's minimum
    assert (wan.video.num_frames, wan.video.height, wan.video.width) == (49, 480, 832)
    assert wan.latent_frames == 13
    assert wan.schedule.denoising_timesteps == [1000, 757, 522] and wan.schedule.shift == 8.0
    assert wan.gan.disc_blocks == 16 and wan.gan.head_blocks == [7, 13, 15]


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
    ],
)
def test_bad_input_names_the_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", [override])
    assert key in str(ei.value)


def test_impossible_parallel_layout_names_the_key():
    cfg = load_config("tiny", ["parallel.sp_size=3"])
    with pytest.raises(ConfigError, match="parallel.sp_size"):
        validate(cfg, num_heads=4)
    cfg = load_config("tiny", ["parallel.sp_size=2"])
    validate(cfg, num_heads=4, world_size=2)
    with pytest.raises(ConfigError, match="parallel.sp_size"):
        validate(cfg, num_heads=4, world_size=3)


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
