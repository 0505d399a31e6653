"""``python -m kd.weights convert IN.pdparams OUT.safetensors --arch resnet50_vd``."""

import sys

from kd.weights.convert import main

if __name__ == "__main__":
    sys.exit(main())
