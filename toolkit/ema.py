"""An exponential moving average of the weights (train.ema), after timm's ModelEmaV3: a copy of the network
updated once per optimizer step on the device with torch._foreach_lerp_, saved in the resume state, validated
beside the trained model and, with use_for: best, what checkpoints/best holds."""

from __future__ import annotations

import copy

import torch
from torch import nn

from toolkit.config import EmaConfig
from toolkit.hooks import Hook


class ModelEma(nn.Module):
    """`module`: a copy of `net` whose floating-point state (weights and BatchNorm statistics) follows
    ema = decay_t * ema + (1 - decay_t) * net after each update, other state (counters) copied.
    decay_t ramps linearly from 0 (the first update copies `net`) to `decay` over `warmup` updates."""

    def __init__(self, net: nn.Module, decay: float, warmup: int = 0):
        super().__init__()
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        # Accelerate's prepare() may have patched an autocast into the instance's forward: the copy runs
        # the class's own forward, in validation's precision
        for name in ("forward", "_original_forward"):
            self.module.__dict__.pop(name, None)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        ema, live = self.module.state_dict().values(), net.state_dict().values()  # views of the tensors
        pairs = list(zip(ema, live))
        self._lerped = [(e, n) for e, n in pairs if e.is_floating_point()]
        self._copied = [(e, n) for e, n in pairs if not e.is_floating_point()]

    def decay_at(self, update: int) -> float:
        """The decay of update number `update` (1-based)."""
        return self.decay * min(1.0, (update - 1) / self.warmup) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)  # a Python float: no device value is read
        torch._foreach_lerp_([e for e, _ in self._lerped], [n for _, n in self._lerped], weight)
        for e, n in self._copied:
            e.copy_(n)

    def state_dict(self, *args, **kwargs) -> dict:  # what Accelerate's resume state holds
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict, strict: bool = True):
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state["updates"])


class EmaHook(Hook):
    """train.ema.decay set: the EMA made at set-up, registered for checkpointing, updated after each
    optimizer step, validated as `ema` (val_acc_ema) and, with use_for: best, served."""

    def __init__(self, cfg: EmaConfig):
        self.cfg, self.ema = cfg, None

    def on_setup(self, run) -> None:
        self.ema = ModelEma(run.net, self.cfg.decay, self.cfg.warmup)
        run.accelerator.register_for_checkpointing(self.ema)

    def after_optimizer_step(self, run, global_step: int) -> None:
        self.ema.update()

    def validated(self, run) -> dict[str, nn.Module]:
        return {"ema": self.ema.module}

    def serves(self, run) -> str | None:
        return "ema" if self.cfg.use_for == "best" else None
