"""Run configuration: the typed schema, YAML loading, ``--set`` overrides and validation.

:mod:`diloco.config.schema` holds the sections and their defaults, loading and the reference;
:mod:`diloco.config.rules` the ranges and cross-field rules; :mod:`diloco.config.defaults` the
defaults the library (:class:`diloco.DiLoCo`) shares with the schema. Nothing here imports
torch: configs are loaded and checked before any heavy import.
"""

from diloco.config.schema import (
    FINGERPRINT_IGNORE,
    Config,
    DataConfig,
    InnerConfig,
    ModelConfig,
    OuterConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    config_fingerprint,
    config_from_dict,
    config_reference,
    config_to_dict,
    dump_config,
    load_config,
)

__all__ = [
    "FINGERPRINT_IGNORE",
    "Config",
    "DataConfig",
    "InnerConfig",
    "ModelConfig",
    "OuterConfig",
    "RunConfig",
    "TopologyConfig",
    "TrainConfig",
    "config_fingerprint",
    "config_from_dict",
    "config_reference",
    "config_to_dict",
    "dump_config",
    "load_config",
]
