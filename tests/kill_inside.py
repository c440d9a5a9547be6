"""`toolkit train ARGS` in this process, killing itself with SIGKILL inside a checkpoint write, for
test_preempt_signals.py: `best` once the weights of the second checkpoints/best are written (before its
meta.json and its link), `mid` once Accelerate's save_state has written the staging directory named next
(before trainer_state.json and the link)."""

import os
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from toolkit.cli import main
from toolkit.rundir import Meta

where, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if where == "best":
    real_write, written = Meta.write, []

    def write(self, path):
        written.append(path)
        if len(written) == int(target):
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, path)

    Meta.write = write
else:
    real_save = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = real_save(self, output_dir, **kwargs)
        if Path(output_dir).name == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state
sys.exit(main(["train", *args]))
