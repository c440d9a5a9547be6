"""`toolkit train ARGS` as toolkit/train.py runs it under `accelerate launch`, pausing PAUSE_S seconds (default 60)
once Accelerate's save_state has written the staging directory named TARGET, before the rest of that
checkpoint (trainer_state.json, the link): for test_kill_resume.py, which SIGKILLs the run from outside
while a checkpoint is being written. Without the pause, on a fast machine the write is over before a
poller sees it."""

import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from toolkit.cli import main

target, args = sys.argv[1], sys.argv[2:]
real_save = Accelerator.save_state


def save_state(self, output_dir=None, **kwargs):
    result = real_save(self, output_dir, **kwargs)
    if Path(output_dir).name == target:
        time.sleep(float(os.environ.get("PAUSE_S", "60")))
    return result


Accelerator.save_state = save_state
sys.exit(main(["train", *args]))
