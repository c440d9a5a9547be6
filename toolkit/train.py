"""Entry point for `accelerate launch toolkit/train.py --config cifar.yaml [--set KEY=VALUE ...]`."""

import os
import sys

if __name__ == "__main__":
    # Run as a script, Python puts toolkit/ itself first on sys.path; drop it so our module names
    # never shadow top-level ones, and import the package as a package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    from toolkit.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
