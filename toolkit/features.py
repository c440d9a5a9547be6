"""The loop's optional features the config asks for, each a hook in a module of its own (EMA, mixup/cutmix,
top-k checkpoints): the engine adds them and reads none of their keys."""

from __future__ import annotations

from toolkit.config import RunConfig
from toolkit.ema import EmaHook
from toolkit.hooks import Hook
from toolkit.mix import MixHook, mixes
from toolkit.topk import TopK


def feature_hooks(cfg: RunConfig) -> list[Hook]:
    hooks: list[Hook] = []
    if cfg.train.ema.decay is not None:
        hooks.append(EmaHook(cfg.train.ema))
    if mixes(cfg.data.augment):
        hooks.append(MixHook(cfg.data.augment))
    if cfg.train.save_top_k:
        hooks.append(TopK(cfg.train.save_top_k))
    return hooks
