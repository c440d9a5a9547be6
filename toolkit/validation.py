"""Validation of the model every process holds: the BatchNorm buffers made equal first, then loss, accuracy
and sample count over exactly the validation set."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast


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
        losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        losses, preds, labels = accelerator.gather_for_metrics((losses, logits.argmax(1), labels))
        loss_sum += losses.sum().item()
        correct += (preds == labels).sum().item()
        seen += len(labels)
    return loss_sum / seen, correct / seen, seen
