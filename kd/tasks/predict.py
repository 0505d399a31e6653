"""``task=predict``: the top classes of ``student.weights`` for each image of ``predict.inputs``.

Images are read with the student's own preprocessing (from its card): converted to grayscale for a
1-channel model and to RGB otherwise, resized and center-cropped, scaled to [0, 1]; the model normalizes.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from kd.errors import KdError
from kd.io import write_atomic
from kd.models import Preprocessing
from kd.tasks.common import output_dir, trained_student_of
from kd.tasks.records import write_results

log = logging.getLogger("kd")


def image_files(inputs: str | None) -> list[Path]:
    """``inputs`` itself, or every image under it (recursively, sorted) when it is a folder."""
    if inputs in (None, "", "???"):
        raise KdError("predict.inputs is not set; pass predict.inputs=IMAGE_FILE or predict.inputs=FOLDER")
    path = Path(str(inputs)).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KdError(f"predict.inputs={inputs} does not exist; pass an image file or a folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise KdError(f"predict.inputs={inputs} holds no image ({', '.join(IMG_EXTENSIONS)}); pass a folder of images")
    return files


def prediction_view(preprocessing: Preprocessing) -> T.Compose:
    """What the validation split did: resize to input_size / crop_pct, center-crop input_size, scale to [0, 1]."""
    channels, height, width = preprocessing.input_size
    scale = (math.floor(height / preprocessing.crop_pct), math.floor(width / preprocessing.crop_pct))
    resize = scale[0] if height == width else scale  # square: the short side, keeping the aspect ratio
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(resize, interpolation=InterpolationMode(preprocessing.interpolation), antialias=True),
            T.CenterCrop((height, width)),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageFiles(Dataset):
    def __init__(self, files: list[Path], preprocessing: Preprocessing) -> None:
        self.files = files
        self.mode = "L" if preprocessing.in_chans == 1 else "RGB"
        self.view = prediction_view(preprocessing)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return self.view(image.convert(self.mode)).as_subclass(torch.Tensor)
        except (UnidentifiedImageError, OSError) as error:
            raise KdError(
                f"image {path} cannot be read ({type(error).__name__}); remove it from predict.inputs"
            ) from None


def top_classes(model: torch.nn.Module, loader: DataLoader, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and class indices of the ``k`` most likely classes of every image, in order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    probs, indices = [], []
    with torch.inference_mode():
        for images in loader:
            top = model(images.to(device)).softmax(dim=1).topk(k, dim=1)
            probs.append(top.values.cpu())
            indices.append(top.indices.cpu())
    return torch.cat(probs), torch.cat(indices)


def write_csv(path: Path, files: list[Path], names: list[list[str]], probs: torch.Tensor) -> Path:
    k = probs.shape[1]
    header = ["image"] + [column for rank in range(1, k + 1) for column in (f"class_{rank}", f"prob_{rank}")]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for file, row_names, row_probs in zip(files, names, probs.tolist(), strict=True):
                pairs = zip(row_names, row_probs, strict=True)
                writer.writerow([str(file), *[x for name, p in pairs for x in (name, f"{p:.6f}")]])

    return write_atomic(path, write, "predictions file")


def predict(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    settings = cfg.predict
    files = image_files(settings.get("inputs"))
    if settings.top_k < 1 or settings.batch_size < 1:
        raise KdError(f"predict.top_k={settings.top_k} and predict.batch_size={settings.batch_size} must be at least 1")
    out = output_dir(cfg)
    student, card = trained_student_of(cfg)
    k = min(settings.top_k, card.num_classes)
    loader = DataLoader(
        ImageFiles(files, card.preprocessing), batch_size=settings.batch_size, num_workers=settings.num_workers
    )
    probs, indices = top_classes(student, loader, k)
    names = [[card.class_names[i] for i in row] for row in indices.tolist()]
    for file, row_names, row_probs in zip(files, names, probs.tolist(), strict=True):
        print(f"{file}: " + ", ".join(f"{name} {100 * p:.2f}%" for name, p in zip(row_names, row_probs, strict=True)))
    csv_path = write_csv(Path(settings.output), files, names, probs)
    log.info("top-%d classes of %d images written to %s", k, len(files), csv_path)
    results = {
        "metrics": {},
        "weights": str(cfg.student.get("weights")),
        "images": len(files),
        "predictions": str(csv_path),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "output_dir": str(out),
    }
    write_results(out, cfg, "predict", **results)
    return results
