"""The teacher measured where the training validation cannot: each ensemble member, and the teacher on its own view.

The validation loop of a distill run feeds the teacher the student's view (``teacher/top1``): the student's
resize, crop and size (resized to the teacher's size where they differ). A teacher's published accuracy is on its
own view. Where the data can make that view (an image folder resizes each image itself), ``teacher/top1_own_view``
measures the teacher on it; the teacher never changes, so one pass at the end of the run is enough. Ensembles
also report every member (``teacher/0/top1``, ...), on the student's view and, where it differs, on their own.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from kd.data import ClassificationData
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.frozen import FrozenTeacher


def top_k_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).sum())


def accuracy(
    models: dict[str, FrozenTeacher | EnsembleTeacher], dataset: Dataset, data: ClassificationData, device
) -> dict[str, float]:
    """top-1 (and top-5 above 5 classes) of each model over ``dataset``, keys ``<prefix>top1``."""
    correct: dict[str, list[int]] = {name: [0, 0] for name in models}
    total = 0
    for images, target in DataLoader(dataset, batch_size=data.eval_batch_size, num_workers=data.num_workers):
        images, target = images.to(device), target.to(device)
        total += len(target)
        for name, model in models.items():
            logits = model(images)
            correct[name][0] += top_k_correct(logits, target, 1)
            correct[name][1] += top_k_correct(logits, target, 5)
    metrics = {}
    for name, (top1, top5) in correct.items():
        metrics[f"{name}top1"] = top1 / max(total, 1)
        if data.num_classes > 5:
            metrics[f"{name}top5"] = top5 / max(total, 1)
    return metrics


def own_view(teacher: FrozenTeacher, data: ClassificationData) -> Dataset | None:
    pre = teacher.preprocessing
    return data.own_view_set(pre.input_size[-1], pre.interpolation, pre.crop_pct)


def teacher_view_metrics(
    teacher: FrozenTeacher | EnsembleTeacher, data: ClassificationData, device: torch.device | str
) -> dict[str, float]:
    """``teacher/<i>/top1`` per ensemble member (the student's view), and ``.../top1_own_view`` wherever the
    data can show a model its own view; empty for a single teacher whose own view is the student's."""
    metrics: dict[str, float] = {}
    singles = dict(enumerate(teacher.members)) if isinstance(teacher, EnsembleTeacher) else {None: teacher}
    if isinstance(teacher, EnsembleTeacher):
        members = {f"teacher/{i}/": member for i, member in singles.items()}
        metrics |= accuracy(members, data.val_set, data, device)
    for index, model in singles.items():
        dataset = own_view(model, data)
        if dataset is None:
            continue
        prefix = "teacher/" if index is None else f"teacher/{index}/"
        own = accuracy({prefix: model}, dataset, data, device)
        metrics |= {f"{key}_own_view": value for key, value in own.items()}
    return metrics
