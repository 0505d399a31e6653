"""kd.quantize: the INT8 student from Python, on plain DataLoaders and plain networks."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader, TensorDataset

import kd
from kd.models.convnet import ConvNet
from kd.students.quantize import int8_nodes, onnx_logits


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(96, 1, 8, 8, generator=generator), torch.randint(0, 10, (96,), generator=generator)
    train = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(images[64:], labels[64:]), batch_size=32)


def test_kd_quantize_writes_an_int8_file_from_plain_networks_and_loaders(tmp_path):
    torch.manual_seed(0)
    view = {"mean": [0.3], "std": [0.4], "input_size": [1, 8, 8]}
    teacher = kd.as_classifier(ConvNet(10, in_chans=1, width=16, depth=2), **view)
    student = kd.as_classifier(ConvNet(10, in_chans=1, width=8, depth=2), **view)
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    train, val = loaders()
    results = kd.quantize(student, teacher, train, val, output_dir=tmp_path, epochs=1, calibration_batches=2)

    assert results["quantize"]["method"] == "qad" and results["quantize"]["calibration_images"] == 32
    assert results["teacher_fingerprint"]["start"] == results["teacher_fingerprint"]["end"]
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, before_student[k]) for k, v in student.state_dict().items())  # left as it was
    int8 = tmp_path / "student.int8.onnx"
    assert int8_nodes(int8)["int8_weights"] == 3
    images = torch.cat([batch[0] for batch in val])
    labels = torch.cat([batch[1] for batch in val])
    top1 = float((onnx_logits(int8, [images]).argmax(1) == labels).float().mean())
    assert results["metrics"]["student/top1"] == top1
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "quantize"
    assert json.loads((tmp_path / "student.int8.json").read_text())["class_names"] == [str(i) for i in range(10)]
