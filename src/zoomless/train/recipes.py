"""The recipe table the CLI dispatches on: method name -> (config class, entry function)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from zoomless.train.config import (
    ConfigError,
    GRPOConfig,
    OPDConfig,
    SFTConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    resolve_paths,
)


def _sft(cfg: Any) -> Path:
    from zoomless.train.sft import train_sft

    return train_sft(cfg)


def _opd(cfg: Any) -> Path:
    from zoomless.train.opd import train_opd

    return train_opd(cfg)


def _grpo(cfg: Any) -> Path:
    from zoomless.train.grpo import train_grpo

    return train_grpo(cfg)


RECIPES: dict[str, tuple[type[TrainConfig], Callable[[Any], Path]]] = {
    "sft": (SFTConfig, _sft),
    "opd": (OPDConfig, _opd),
    "grpo": (GRPOConfig, _grpo),
}


def _recipe(method: str) -> tuple[type[TrainConfig], Callable[[Any], Path]]:
    if method not in RECIPES:
        raise ConfigError(f"unknown training method {method!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[method]


def load(
    method: str, config: str | Path | None, overrides: list[str] | dict[str, Any] | None = None, resume: bool = False
) -> TrainConfig:
    """The validated config of `method` from a YAML file plus `key=value` overrides (ConfigError if wrong).

    Relative paths written in the file (model_dir, data, out_dir) are taken relative to the file's
    folder, as in a synth config; paths given as overrides, relative to the working folder."""
    cls, _ = _recipe(method)
    values = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if resume:
        values["resume"] = True
    return load_config(config, cls, values, prepare=resolve_paths)


def run(method: str, cfg: TrainConfig) -> Path:
    """Train; return the final checkpoint directory."""
    _, entry = _recipe(method)
    return entry(cfg)
