"""Run under `accelerate launch`: `toolkit train` with an out-of-memory injected above a per-process
limit, so a test can check that the processes agree on the smallest batch size found.

    accelerate launch ... tests/oom_probe.py LIMIT0,LIMIT1 --config smoke.yaml --set KEY=VALUE ...
"""

from __future__ import annotations

import os
import sys

import toolkit.batch_size
from toolkit.cli import main

# the launcher's RANK, read here only: an Accelerate state made this early would pre-empt the toolkit's own
limit = int(sys.argv[1].split(",")[int(os.environ.get("RANK", "0"))])
real = toolkit.batch_size.step_fits


def step_fits(cfg, accelerator, bundle, network, augment, batch_size):
    if batch_size > limit:
        raise RuntimeError(f"CUDA out of memory. Tried to allocate {batch_size} images (injected)")
    real(cfg, accelerator, bundle, network, augment, batch_size)


toolkit.batch_size.step_fits = step_fits
sys.exit(main(["train", *sys.argv[2:]]))
