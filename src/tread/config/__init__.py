"""Typed run configuration: dataclasses (`.schema`, `.model`, `.sampling`) and presets, overrides,
YAML (`.loading`).

The dataclasses are the single source of truth. Unknown keys, bad values and sections that
contradict each other (a flow objective with an EDM sampler, a route past the last block) raise
:class:`~tread.errors.ConfigError` naming them, before anything runs.
"""

from .loading import (
    DEFAULT_PRESET,
    PRESET_DIR,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    describe_resolved,
    load_config,
    preset_path,
    split_config_args,
    to_object,
)
from .model import ARCH_KEYS, ModelConfig, RouteConfig
from .sampling import SampleConfig
from .schema import (
    DEVICES,
    OBJECTIVE_KEYS,
    OBJECTIVES,
    PRECISIONS,
    TIME_SAMPLINGS,
    Config,
    DataConfig,
    EMAConfig,
    EvalConfig,
    ObjectiveConfig,
    OptimConfig,
    Precision,
    ReferenceSplit,
    TrainConfig,
    TrainDevice,
    feature_net_names,
    inactive_objective_keys,
)

__all__ = [
    "ARCH_KEYS",
    "Config",
    "DEFAULT_PRESET",
    "DEVICES",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "ModelConfig",
    "OBJECTIVES",
    "OBJECTIVE_KEYS",
    "ObjectiveConfig",
    "OptimConfig",
    "PRECISIONS",
    "PRESET_DIR",
    "Precision",
    "ReferenceSplit",
    "RouteConfig",
    "SampleConfig",
    "TIME_SAMPLINGS",
    "TrainConfig",
    "TrainDevice",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "describe_resolved",
    "feature_net_names",
    "inactive_objective_keys",
    "load_config",
    "preset_path",
    "split_config_args",
    "to_object",
]
