"""Write a trained student on its own: .safetensors weights, ONNX, TorchScript, and its card as JSON.

Only the student's network is written: never the teacher, never loss-side modules such as feature
adapters. ONNX and TorchScript files take images in [0, 1] and normalize them themselves; both are
checked against PyTorch on two batch sizes before they replace any earlier file.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from kd.errors import KdError
from kd.io import write_atomic, write_json_atomic
from kd.models import Classifier
from kd.students.card import StudentCard
from kd.weights.files import METADATA_KEY

log = logging.getLogger("kd")

TOLERANCE = 1e-4  # exported logits must match PyTorch's to this, absolute plus relative (torch.allclose)
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # onnxscript: the torch.export-based exporter needs it
CHECK_BATCH_SIZES = (1, 3)  # both differ from the batch of 2 the graphs are traced with: the batch is dynamic


def example_images(card: StudentCard, batch_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, *card.preprocessing.input_size, generator=generator)


def check_matches(run: Callable[[torch.Tensor], torch.Tensor], model: Classifier, card: StudentCard, fmt: str) -> float:
    """Raise unless ``run`` (an exported model) gives PyTorch's logits on random images of two batch sizes;
    returns the largest absolute difference."""
    largest = 0.0
    for batch_size in CHECK_BATCH_SIZES:
        images = example_images(card, batch_size, seed=batch_size)
        with torch.inference_mode():
            expected = model(images)
        got = run(images)
        if got.shape != expected.shape:
            problem = f"gives logits of shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
        elif not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
            problem = f"differs from PyTorch by up to {(got - expected).abs().max().item():.3g} (allowed {TOLERANCE})"
        else:
            problem = None
        if problem:
            raise KdError(
                f"the {fmt} export of {card.model or 'the student'} {problem} on a batch of {batch_size}, so no "
                f"{fmt} file was written; leave {fmt} out of export.formats and report the model"
            )
        largest = max(largest, (got - expected).abs().max().item())
    log.info(
        "%s: the exported model gives PyTorch's logits to within %.1e on random batches of %s images",
        fmt,
        largest,
        " and ".join(map(str, CHECK_BATCH_SIZES)),
    )
    return largest


def write_safetensors(model: Classifier, card: StudentCard, path: Path) -> Path:
    """The bare network's weights (``student.weights=<file>`` loads them), with the card in the header."""
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in model.net.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(card.to_dict())}
    return write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), "student weights")


def write_onnx(model: Classifier, card: StudentCard, path: Path) -> Path:
    import onnxruntime  # check_formats made sure it is installed

    for name in ("onnxscript", "onnx_ir"):  # one INFO line per optimizer pass otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example_images(card, 2),),
        dynamo=True,  # the legacy TorchScript-based exporter is deprecated
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: batch}},
        verbose=False,
    )

    def write(tmp: Path) -> None:
        program.save(tmp, external_data=False)  # one self-contained file (models under 2 GB)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check_matches(lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model, card, "onnx")

    return write_atomic(path, write, "ONNX export")


def write_torchscript(model: Classifier, card: StudentCard, path: Path) -> Path:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; the README says so. It still traces and loads.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        # Classifier's grayscale-to-RGB check reads the channel count, which input_size fixes: a constant is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="kd.models.classifier")
        traced = torch.jit.trace(model, example_images(card, 2))

        def write(tmp: Path) -> None:
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            check_matches(lambda x: loaded(x).detach(), model, card, "torchscript")

        return write_atomic(path, write, "TorchScript export")


WRITERS: dict[str, tuple[str, Callable[[Classifier, StudentCard, Path], Path]]] = {
    "safetensors": (".safetensors", write_safetensors),
    "onnx": (".onnx", write_onnx),
    "torchscript": (".torchscript.pt", write_torchscript),
}


def check_formats(formats: Sequence[str]) -> list[str]:
    """The formats, once each, after checking that each is known and its packages are installed."""
    formats = list(dict.fromkeys(str(fmt) for fmt in formats))
    unknown = [fmt for fmt in formats if fmt not in WRITERS]
    if unknown or not formats:
        raise KdError(f"export.formats={formats} must list one or more of {', '.join(WRITERS)}")
    if "onnx" in formats:
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise KdError(
                f"export.formats=onnx needs {', '.join(missing)}; install them with pip install -e '.[export]'"
            )
    return formats


def export_student(
    student: Classifier, card: StudentCard, folder: str | Path, formats: Sequence[str], name: str = "student"
) -> dict[str, Path]:
    """Write ``student`` in each of ``formats`` and its card as ``<name>.json``; returns the files by format."""
    formats = check_formats(formats)
    folder = Path(folder)
    model = copy.deepcopy(student).cpu().eval()  # the caller's student keeps its device and mode
    written = {}
    for fmt in formats:
        suffix, write = WRITERS[fmt]
        written[fmt] = write(model, card, folder / f"{name}{suffix}")
        log.info("wrote %s", written[fmt])
    written["card"] = write_json_atomic(folder / f"{name}.json", card.to_dict(), "student card")
    return written
