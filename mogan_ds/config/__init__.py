"""The config tree (`schema`), its loader (`load`) and its checks (`validate`): one import for users.

from mogan_ds.config import Config, load_config
cfg = load_config("wan2.1-t2v-1.3b", ["parallel.sp_size=4"])
"""

from ..errors import ConfigError
from .load import RECIPES_DIR, dump_yaml, load_config, recipe_path, to_dict
from .schema import (
    WAN_LORA_TARGETS,
    Config,
    DataConfig,
    DMDConfig,
    EvalConfig,
    FakeScoreLoraConfig,
    GANConfig,
    LoggingConfig,
    LoraRoleConfig,
    LoraRolesConfig,
    ModelsConfig,
    OptimConfig,
    OptimizersConfig,
    OutputConfig,
    ParallelConfig,
    ScheduleConfig,
    TextConfig,
    TrainConfig,
    VideoConfig,
    ZeroStagesConfig,
    field_help,
    range_text,
)
from .validate import check_ranges, validate

__all__ = [
    "RECIPES_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DMDConfig",
    "EvalConfig",
    "FakeScoreLoraConfig",
    "GANConfig",
    "LoggingConfig",
    "LoraRoleConfig",
    "LoraRolesConfig",
    "ModelsConfig",
    "OptimConfig",
    "OptimizersConfig",
    "OutputConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TextConfig",
    "TrainConfig",
    "VideoConfig",
    "WAN_LORA_TARGETS",
    "ZeroStagesConfig",
    "check_ranges",
    "dump_yaml",
    "field_help",
    "load_config",
    "range_text",
    "recipe_path",
    "to_dict",
    "validate",
]
