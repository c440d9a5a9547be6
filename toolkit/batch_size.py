"""data.batch_size: auto: the largest per-device batch whose training step fits in memory, found with
Accelerate's find_executable_batch_size on data already read (never re-read per try), the same on every
process (the smallest found), capped on the CPU, where memory does not run out the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import should_reduce_batch_size

from toolkit.config import RunConfig
from toolkit.errors import ToolkitError


def step_fits(cfg: RunConfig, accelerator: Accelerator, bundle, network, augment, batch_size: int) -> None:
    """One training step (forward, backward, optimizer step) of `batch_size` images on the device;
    raises the allocator's out-of-memory error when it does not fit. The seam tests replace."""
    net = network().to(accelerator.device)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    index = torch.arange(batch_size) % len(bundle.train)  # a small set repeats: the memory is what counts
    images, labels = bundle.train.__getitems__(index.tolist()) if hasattr(bundle.train, "__getitems__") else (
        torch.stack([bundle.train[i][0] for i in index.tolist()]), torch.tensor([bundle.train[i][1] for i in index.tolist()]))
    images, labels = images.to(accelerator.device), torch.as_tensor(labels).to(accelerator.device)
    with accelerator.autocast():
        loss = F.cross_entropy(net(augment(images, train=True)).float(), labels)
    loss.backward()
    optimizer.step()
    del net, optimizer, loss


def find_batch_size(cfg: RunConfig, accelerator: Accelerator, bundle, network, augment) -> int:
    """Halve from data.auto_batch_size_max until a step fits; then the smallest over all processes
    (0 when not even one image fits: the caller says so)."""
    size = cfg.data.auto_batch_size_max

    def halve() -> int:
        nonlocal size
        size //= 2
        return size

    def attempt(batch_size: int) -> int:
        step_fits(cfg, accelerator, bundle, network, augment, batch_size)  # looked up here: tests inject a limit
        return batch_size

    try:
        found = find_executable_batch_size(attempt, starting_batch_size=size, reduce_batch_size_fn=halve)()
    except RuntimeError as exc:
        if "No executable batch size found" not in str(exc):
            raise
        found = 0
    everyone = accelerator.gather(torch.tensor([found], device=accelerator.device))
    return int(everyone.min())


def out_of_memory(cfg: RunConfig, exc: BaseException) -> ToolkitError | None:
    """The device's out-of-memory error as a ToolkitError naming the batch size and what to change (None
    for any other error). checkpoints/last still holds the last saved point: --resume continues from it."""
    if not should_reduce_batch_size(exc):
        return None
    size = cfg.data.batch_size
    what = f"data.batch_size {size}" if size != "auto" else "the batch size data.batch_size auto found"
    return ToolkitError(f"out of memory training with {what} per process ({str(exc).splitlines()[0][:160]}). "
                        f"Lower data.batch_size and raise train.grad_accum_steps (now {cfg.train.grad_accum_steps}) "
                        "to keep the effective batch, or set data.batch_size: auto to find the largest that fits. "
                        f"{cfg.run_dir} is kept: --resume continues from checkpoints/last.")
