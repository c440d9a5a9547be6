"""Validation of the model every process holds: the BatchNorm buffers made equal first, then loss, accuracy
and sample count over exactly the validation set; for the trained model and every module a hook adds (an EMA
of the weights), and which of them checkpoints/best holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from toolkit.data.shard_plan import PAD_LABEL

if TYPE_CHECKING:
    from toolkit.hooks import Hook
    from toolkit.training import Training


def sync_buffers(accelerator: Accelerator, net: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics) before validating.
    DDP broadcasts them at the start of each training forward, so after the epoch's last step each
    process holds statistics updated by its own batch; validation must measure the model that is saved."""
    buffers = list(net.buffers())
    if accelerator.num_processes > 1 and buffers:
        broadcast(buffers, from_process=0)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, forward, loader, augment) -> tuple[float, float, int]:
    """Loss, accuracy and sample count over exactly the validation set (no padded duplicates);
    `forward` runs `model` (put in eval mode here) in the validation precision."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        logits = forward(augment(images, train=False))
        losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none", ignore_index=PAD_LABEL)
        losses, preds, labels = accelerator.gather_for_metrics((losses, logits.argmax(1), labels))
        real = labels != PAD_LABEL  # a shard set's padding, which gives every process a batch of one shape
        loss_sum += losses[real].sum().item()
        correct += (preds[real] == labels[real]).sum().item()
        seen += int(real.sum().item())
    return loss_sum / seen, correct / seen, seen


def validate(run: Training, hooks: Sequence[Hook] = ()) -> dict:
    """val_loss, val_acc (the trained model) and val_loss_<name>, val_acc_<name> for each module a hook
    adds, and val_samples; each module's buffers are the main process's first."""
    sync_buffers(run.accelerator, run.net)
    val_loss, val_acc, samples = evaluate(run.accelerator, run.model, run.eval_forward, run.val_loader, run.augment)
    scores = {"val_loss": val_loss, "val_acc": val_acc}
    for name, module in extra_modules(run, hooks).items():
        sync_buffers(run.accelerator, module)
        scores[f"val_loss_{name}"], scores[f"val_acc_{name}"], _ = evaluate(
            run.accelerator, module, precision_forward(run, module), run.val_loader, run.augment)
    return {**scores, "val_samples": samples}


def extra_modules(run: Training, hooks: Sequence[Hook]) -> dict[str, torch.nn.Module]:
    return {name: module for hook in hooks for name, module in hook.validated(run).items()}


def served(run: Training, hooks: Sequence[Hook] = ()) -> tuple[torch.nn.Module, str]:
    """The module checkpoints/best holds and the metric that ranks it: the trained network and `val_acc`,
    unless a hook serves one of the modules it adds."""
    extra = extra_modules(run, hooks)
    for hook in hooks:
        if (name := hook.serves(run)) is not None:
            return extra[name], f"val_acc_{name}"
    return run.net, "val_acc"


def precision_forward(run: Training, module: torch.nn.Module):
    """A plain module run in validation's precision (fp32, or the training autocast for eval_precision train)."""
    if run.eval_precision == "fp32":
        return module

    def forward(images: torch.Tensor) -> torch.Tensor:
        with run.accelerator.autocast():
            return module(images)
    return forward
