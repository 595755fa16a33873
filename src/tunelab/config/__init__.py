"""Typed run configuration: the schema (public contract) and its loader."""

from tunelab.config.load import load_config, parse_overrides
from tunelab.config.schema import DataCfg, MethodCfg, ModelCfg, RunConfig, TrainCfg

__all__ = [
    "DataCfg",
    "MethodCfg",
    "ModelCfg",
    "RunConfig",
    "TrainCfg",
    "load_config",
    "parse_overrides",
]
