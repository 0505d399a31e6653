"""Write tests/data/paddleclas_resnet50_vd.pdparams.xz and its logits with real PaddlePaddle and PaddleClas.

CI has no PaddlePaddle, so tests/test_paddle_fixture.py checks kd's ``.pdparams`` mapping against these two
committed files, which this script writes with PaddleClas's own ``ResNet50_vd`` and ``paddle.save``: a check
that does not go through kd's own inverse of the mapping (tests/paddle_export.py). Run it only in a separate
environment that has PaddlePaddle (never needed by kd or its tests)::

    python -m venv /tmp/paddle-venv
    /tmp/paddle-venv/bin/pip install paddlepaddle
    /tmp/paddle-venv/bin/pip install --no-deps paddleclas
    # what paddleclas's __init__ imports (measured with paddlepaddle 3.3.1, paddleclas 2.6.0):
    /tmp/paddle-venv/bin/pip install requests opencv-python-headless tqdm prettytable scikit-learn six pyyaml faiss-cpu
    /tmp/paddle-venv/bin/python tests/data/make_paddle_fixture.py

Size. ResNet50_vd has about 23.5M parameters (47 MB in float16), too big to commit. So every convolution
weight is ternary, ``{-s, 0, +s}`` with ``s`` a power of two, 98% zeros in the wide layers and at least 8
nonzeros per output channel, which xz compresses to 0.8 MB.
BatchNorm statistics come from one training-mode pass (momentum 0), so activations stay normalized through
50 layers, and are then rounded to float16. Every value is exact in float16, so the model is cast to float16
before ``paddle.save`` without changing it; the logits are PaddleClas's float32 forward in eval mode on two
seeded 64 px images normalized with PaddleClas's ImageNet mean and std. The ``.pdparams`` bytes are
``paddle.save``'s own, only xz-compressed.
"""

from __future__ import annotations

import lzma
import tempfile
from pathlib import Path

import numpy as np
import paddle
from paddleclas.ppcls.arch.backbone.legendary_models.resnet import ResNet50_vd

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "paddleclas_resnet50_vd.pdparams.xz"
REFERENCE = HERE / "paddleclas_resnet50_vd_logits.npz"
NUM_CLASSES = 10
NONZERO = 0.02  # fraction of nonzero weights of a wide convolution (at least 8 per output channel in all)
MEAN = np.array([0.485, 0.456, 0.406], "float32").reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], "float32").reshape(1, 3, 1, 1)


def main() -> None:
    rng = np.random.RandomState(0)
    paddle.seed(0)
    model = ResNet50_vd(class_num=NUM_CLASSES)
    for key, value in model.state_dict().items():
        if value.ndim == 4:  # a convolution: ternary, sparse, scale 2^-4
            fan_in = int(np.prod(value.shape[1:]))
            mask = rng.rand(*value.shape) < max(NONZERO, 8 / fan_in)
            signs = np.where(rng.rand(*value.shape) < 0.5, -1.0, 1.0)
            value.set_value(np.where(mask, signs / 16, 0.0).astype("float32"))  # +0.0, not -0.0, so zeros compress
        elif key == "fc.weight":  # Paddle stores Linear as [in, out]; small logits, as a trained model gives
            value.set_value((np.round(rng.normal(0, 1, value.shape) * 4) / 1024).astype("float32"))
        elif key == "fc.bias":
            value.set_value((np.round(rng.normal(0, 1, value.shape) * 8) / 64).astype("float32"))
        elif key.endswith(".bn.weight"):
            value.set_value((np.round(rng.uniform(0.5, 1.5, value.shape) * 16) / 16).astype("float32"))
        elif key.endswith(".bn.bias"):
            value.set_value((np.round(rng.normal(0, 0.1, value.shape) * 64) / 64).astype("float32"))
    # BatchNorm statistics of one random batch (momentum 0 stores the batch's own), then made float16-exact.
    for layer in model.sublayers():
        if hasattr(layer, "_momentum"):
            layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(rng.normal(0, 1, (8, 3, 64, 64)).astype("float32")))
    for key, value in model.state_dict().items():
        if key.endswith("_mean") or key.endswith("_variance"):
            value.set_value(value.numpy().astype("float16").astype("float32"))
    for key, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), value.numpy().astype("float16").astype("float32")), key

    model.eval()
    images = rng.rand(2, 3, 64, 64).astype("float32")
    with paddle.no_grad():
        logits = model(paddle.to_tensor((images - MEAN) / STD)).numpy()
    np.savez(REFERENCE, images=images, logits=logits)

    model.to(dtype="float16")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ResNet50_vd.pdparams"
        paddle.save(model.state_dict(), str(path))
        WEIGHTS.write_bytes(lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {WEIGHTS.name} ({WEIGHTS.stat().st_size / 1e6:.2f} MB) and {REFERENCE.name}; logits {logits}")


if __name__ == "__main__":
    main()
