"""The launchable training script: `python megareuse/train.py --config X [overrides]`.

Same as `megareuse train`; this file exists so cluster launchers that take a script path
(deepspeed, torchrun, srun python, mpirun python) start training without an installed console
script.
"""
import os
import sys

if __name__ == "__main__":
    # Run as a file, Python puts megareuse/ itself first on sys.path; drop it so that
    # `megareuse.model` etc. never shadow top-level modules, and find the package above it.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    from megareuse.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
