"""A trained student as an INT8 ONNX model that ONNX Runtime runs with its integer kernels.

Two methods share one path to the INT8 file:

- ``ptq``: the student's BatchNorms are folded into its convolutions (``torch.fx``), the folded network is exported
  to fp32 ONNX, and ONNX Runtime's ``quantize_static`` writes the QDQ model: per-channel symmetric int8 weights,
  per-tensor uint8 activations whose ranges are the minimum and maximum seen on the calibration batches.
- ``qad`` (quantization-aware distillation): the same folded student is first wrapped as ``FakeQuantStudent``,
  which rounds weights and activations in PyTorch the way ONNX Runtime will (same formulas, same tensors:
  convolution and linear inputs, their outputs after a following ReLU, sums), and fine-tuned against the frozen fp32
  teacher. Its fp32 weights then go through exactly the ``ptq`` path: with zero fine-tuning epochs, qad gives
  ptq's file.

Why ONNX Runtime writes the graph: its quantizer knows which node patterns its INT8 kernels fuse (QLinearConv,
QLinearAdd, QGemm), and torchao's PT2E QAT (``prepare_qat_pt2e``) divides by BatchNorm gammas in its simulated
conv-BN fold, so a student with a zero gamma (timm's zero-init residual blocks) turns NaN at the first step.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import operator
import platform
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from kd.errors import KdError
from kd.io import write_atomic
from kd.models import Classifier

log = logging.getLogger("kd")

METHODS = ("qad", "ptq")
#: The layers whose weights are quantized; a subclass that computes its own weights in forward is refused.
QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)
UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: uint8 activations and symmetric int8 weights (-127..127), as ONNX Runtime's quantize_static writes them.
ACT_MIN, ACT_MAX = 0, 255
WEIGHT_MAX = 127
#: Node types of ONNX Runtime's integer kernels, in the file (QDQ) or after its graph optimizations.
INT8_NODES = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger")


def check_settings(method: str, epochs: int, calibration_batches: int) -> None:
    """Refuse a bad method or count before any work."""
    if method not in METHODS:
        raise KdError(f"quantize.method={method} is unknown; use qad (distill while quantized) or ptq (calibrate only)")
    if not isinstance(epochs, int) or epochs < 0:
        raise KdError(f"quantize.epochs={epochs} must be a whole number of epochs, 0 or more")
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise KdError(f"quantize.calibration_batches={calibration_batches} must be at least 1")


def check_packages() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise KdError(f"task=quantize needs {', '.join(missing)}; install them with pip install -e '.[export]'")


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def check_int8_cpu() -> None:
    """ONNX Runtime's x86 INT8 kernels need AVX2 (VNNI makes them fast); without it they are slower than fp32."""
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    capability = cpu_capability()
    if is_x86 and not capability.startswith(("AVX2", "AVX512")):
        raise KdError(
            f"this CPU has no AVX2 ({capability}), so ONNX Runtime's INT8 kernels would run slower than fp32; "
            "deploy the fp32 student.onnx (python run.py task=export) instead"
        )


# --- folding and checking the student ----------------------------------------------------------------------


def fold_batchnorm(student: Classifier, name: str | None = None) -> Classifier:
    """A copy of ``student`` whose BatchNorms after convolutions are folded into them (eval statistics), traced by
    ``torch.fx``; refuses a network kd cannot quantize faithfully, in one sentence."""
    from torch.fx.experimental.optimization import fuse

    label = name or type(student.net).__name__
    check_layers(student.net, label)
    net = copy.deepcopy(student.net).cpu().eval()
    try:
        folded = fuse(net)
    except Exception as error:  # fx cannot trace data-dependent control flow
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise KdError(
            f"student {label} cannot be traced by torch.fx ({reason}), so its quantizers cannot be placed; "
            "quantize a student whose forward has no data-dependent control flow"
        ) from None
    for parameter in folded.parameters():  # fuse gives a convolution without bias a new one that is not trainable
        parameter.requires_grad_(True)
    return Classifier(folded, student.preprocessing)


def check_layers(net: nn.Module, label: str) -> None:
    odd = [
        f"{name} ({type(m).__name__})"
        for name, m in net.named_modules()
        if isinstance(m, UNSUPPORTED_LAYERS)
        or (isinstance(m, QUANTIZED_LAYERS) and type(m).forward not in (nn.Conv2d.forward, nn.Linear.forward))
    ]
    if odd:
        raise KdError(
            f"student {label} has layers the INT8 quantizer cannot handle: {', '.join(odd[:3])}; "
            "quantize a student made of plain Conv2d and Linear layers"
        )
    if not any(isinstance(m, QUANTIZED_LAYERS) for m in net.modules()):
        raise KdError(f"student {label} has no Conv2d or Linear layer to quantize; INT8 would not make it faster")


# --- the fake-quantized student ----------------------------------------------------------------------------


def activation_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX Runtime's ``compute_scale_zp`` for uint8: the range widened to hold 0, 256 levels across it."""
    low, high = low.clamp(max=0.0).double(), high.clamp(min=0.0).double()
    scale = (high - low) / (ACT_MAX - ACT_MIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(ACT_MIN - low / scale).clamp(ACT_MIN, ACT_MAX)
    return scale.float(), zero_point.int()


class ActivationQuant(nn.Module):
    """A uint8 per-tensor fake quantizer: ``observe`` records the range, ``quantize`` rounds to it, ``off`` passes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.mode = "off"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            with torch.no_grad():
                self.low.copy_(torch.minimum(self.low, x.min().float()))
                self.high.copy_(torch.maximum(self.high, x.max().float()))
            return x
        if self.mode == "quantize":
            scale, zero_point = activation_qparams(self.low, self.high)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_MIN, ACT_MAX)
        return x


class WeightQuant(nn.Module):
    """Per-output-channel symmetric int8 rounding of a weight (a parametrization); gradients pass straight."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        absmax = weight.detach().abs().flatten(1).amax(dim=1)
        scale = torch.where(absmax > 0, absmax / WEIGHT_MAX, torch.ones_like(absmax)).float()
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -WEIGHT_MAX, WEIGHT_MAX)


RELUS = (nn.ReLU, F.relu, torch.relu, "relu")
SUMS = (operator.add, torch.add, "add")
#: Ops that keep their input's quantization grid (ONNX Runtime keeps the scale through them).
SAME_GRID = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten, F.max_pool2d, torch.flatten, "flatten", "view")


def target_of(node: fx.Node, modules: dict[str, nn.Module]) -> object:
    if node.op == "call_module":
        return type(modules[node.target])
    return node.target if node.op in ("call_function", "call_method") else None


def is_a(node: fx.Node, modules: dict[str, nn.Module], kinds: tuple) -> bool:
    target = target_of(node, modules)
    return any(target is kind or (isinstance(kind, type) and isinstance(target, type) and issubclass(target, kind))
               for kind in kinds)  # fmt: skip


class FakeQuantStudent(Classifier):
    """The folded student with ONNX Runtime's rounding simulated: uint8 activations on the inputs of every
    convolution and linear layer, on their outputs (after a ReLU that follows), and on sums; int8 weights."""

    def __init__(self, folded: Classifier) -> None:
        graph_module = copy.deepcopy(folded.net)
        if not isinstance(graph_module, fx.GraphModule):
            graph_module = fx.symbolic_trace(graph_module)
        super().__init__(graph_module, folded.preprocessing)
        self.__dict__["plain"] = copy.deepcopy(graph_module).cpu()  # fp32 twin for fp32(); not a registered child
        self.activation_quants = insert_activation_quants(graph_module)
        self.weight_quants = []
        for module in graph_module.modules():
            if isinstance(module, QUANTIZED_LAYERS):
                quant = WeightQuant()
                parametrize.register_parametrization(module, "weight", quant)
                self.weight_quants.append(quant)

    def set_mode(self, mode: str) -> None:
        """``quantize`` (training and the INT8 prediction), ``observe`` (fp32, recording ranges) or ``off`` (fp32)."""
        for quant in self.activation_quants:
            quant.mode = mode
        for quant in self.weight_quants:
            quant.enabled = mode == "quantize"

    @torch.no_grad()
    def calibrate(self, batches: Sequence[torch.Tensor]) -> None:
        """The activation ranges of the fp32 network over ``batches`` (what ONNX Runtime's MinMax calibration sees),
        then quantized mode, ranges frozen."""
        training = self.training
        self.eval()
        for quant in self.activation_quants:
            quant.low.fill_(float("inf"))
            quant.high.fill_(float("-inf"))
        self.set_mode("observe")
        for images in batches:
            self(images.to(self.mean.device))
        self.set_mode("quantize")
        self.train(training)

    def fp32(self) -> Classifier:
        """The trained fp32 network alone (quantizers removed), for the ONNX export that ONNX Runtime quantizes."""
        net = copy.deepcopy(self.plain)
        trained = {
            key.replace("parametrizations.weight.original", "weight"): value
            for key, value in self.net.state_dict().items()
            if not key.startswith("activation_quant_")
        }
        net.load_state_dict(trained)
        return Classifier(net, self.preprocessing).eval()


def insert_activation_quants(graph_module: fx.GraphModule) -> list[ActivationQuant]:
    modules = dict(graph_module.named_modules())
    graph = graph_module.graph
    quants: list[ActivationQuant] = []
    quantized: set[fx.Node] = set()

    def add_after(node: fx.Node) -> None:
        name = f"activation_quant_{len(quants)}"
        quant = ActivationQuant()
        graph_module.add_submodule(name, quant)
        quants.append(quant)
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        quantized.add(new)

    def on_grid(node: fx.Node) -> bool:
        while node not in quantized and is_a(node, modules, SAME_GRID) and node.args:
            node = node.args[0]
        return node in quantized

    for node in list(graph.nodes):
        layer = is_a(node, modules, QUANTIZED_LAYERS)
        if layer and node.args and isinstance(node.args[0], fx.Node) and not on_grid(node.args[0]):
            add_after(node.args[0])
        if layer or is_a(node, modules, SUMS):
            users = list(node.users)
            output = users[0] if len(users) == 1 and is_a(users[0], modules, RELUS) else node
            add_after(output)
    graph.lint()
    graph_module.recompile()
    return quants


# --- the ONNX files ----------------------------------------------------------------------------------------


def quantize_onnx(fp32_onnx: Path, path: Path, calibration: Sequence[torch.Tensor]) -> Path:
    """ONNX Runtime's static QDQ quantization of ``fp32_onnx`` calibrated on ``calibration`` (MinMax), written
    atomically to ``path`` after checking that ONNX Runtime loads it and finds INT8 weights in it."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images.cpu().numpy()} for images in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    def write(tmp: Path) -> None:
        with advice_silenced():
            quantize_static(
                str(fp32_onnx),
                str(tmp),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        check_int8_file(tmp)

    return write_atomic(path, write)


@contextmanager
def advice_silenced() -> Iterator[None]:
    """quantize_static advises its shape-inference pre-processing on the root logger; the exporter's graph has
    its shapes and kd folded the BatchNorms already."""
    advice = lambda record: not str(record.msg).startswith("Please consider")  # noqa: E731
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def int8_nodes(path: Path) -> dict[str, int]:
    """How many nodes of each INT8 type the ONNX file holds, and how many int8 weight tensors (``int8_weights``:
    int8 initializers that a DequantizeLinear reads, zero points left out)."""
    import onnx

    model = onnx.load(str(path))
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in INT8_NODES:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    counts["int8_weights"] = len(int8 & dequantized)
    return counts


def check_int8_file(path: Path) -> None:
    counts = int8_nodes(path)
    if not counts.get("int8_weights") or not counts.get("DequantizeLinear"):
        raise KdError(
            f"ONNX Runtime wrote no INT8 weights into {path.name}, so the model would not run on INT8 kernels; "
            "report the student's architecture"
        )
    session(path)  # loads with ONNX Runtime's graph optimizations (the QDQ fusions)


def session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """The logits ONNX Runtime computes with the file at ``path`` for each image of ``batches``, concatenated."""
    runner = session(path)
    name = runner.get_inputs()[0].name
    return torch.cat([torch.from_numpy(runner.run(None, {name: np.asarray(images.cpu())})[0]) for images in batches])
