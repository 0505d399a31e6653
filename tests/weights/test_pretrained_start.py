"""A distillation run starts from the student's pretrained weights, whatever their source.

Each source (``weights: auto``, a local file, a PaddleClas ``.pdparams``) is checked twice: the weights the
student holds when ``trainer.fit`` starts are the file's, tensor for tensor, and ``student_init/top1`` is
the accuracy those weights have on the validation split, measured here by a plain loop.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from kd.models import Classifier
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data
from kd.tasks.train import fit
from tests.conftest import FAST
from tests.paddle_export import paddle_state, save_pdparams

# float32, as weights=auto's pretraining measures its val_top1: a bf16-mixed validation can differ by an image
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "sched.warmup_epochs=0", "trainer.precision=32-true"]


def start_probe(tmp_path) -> tuple[list[str], object]:
    path = tmp_path / "start.safetensors"
    return [
        "+callbacks.start_weights._target_=tests.start_weights.SaveStartWeights",
        f"+callbacks.start_weights.path={path}",
    ], path


def top1(model: Classifier, loader) -> float:
    """Validation accuracy by a plain loop, independent of the run's metrics."""
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model.eval()(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def assert_same_state(started: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    assert set(started) == set(source)
    different = [key for key in source if not torch.equal(started[key], source[key].to(started[key].dtype))]
    assert not different, f"the student did not start from its weights file: {different[:3]}"


def test_auto_weights_start_the_student_and_its_cached_accuracy_is_the_initial_accuracy(make_cfg, tmp_path):
    probe, started = start_probe(tmp_path)
    cfg = make_cfg(*FAST, *SHORT, *probe)
    results = fit(cfg, task="distill")
    data = build_data(cfg, cfg.student)
    cached = AutoWeights(cfg.paths.cache_dir, cfg.data, data).path_for(cfg.student)
    assert_same_state(load_file(started), load_file(cached))
    own = json.loads(cached.with_suffix(".json").read_text())["val_top1"]
    assert results["metrics"]["student_init/top1"] == own  # measured on the same split when it was trained
    assert own > 0.2  # a pretrained digits student (2 epochs in FAST), not a random one (0.1)


def test_a_local_file_starts_the_student(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "trainer.precision=32-true")
    data = build_data(cfg, cfg.student)
    cached_path = AutoWeights(cfg.paths.cache_dir, cfg.data, data).path_for(cfg.student)
    if not cached_path.is_file():  # the session cache has no student yet: a short run fills it
        fit(make_cfg(*FAST, *SHORT), task="distill")
    cached = load_file(cached_path)
    generator = torch.Generator().manual_seed(1)  # other weights than the auto cache's, so a mix-up shows
    mine = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in cached.items()
    }
    path = tmp_path / "my-student.pth"
    torch.save(mine, path)

    probe, started = start_probe(tmp_path)
    results = fit(make_cfg(*FAST, *SHORT, *probe, f"student.weights={path}"), task="distill")
    assert_same_state(load_file(started), mine)
    arch = instantiate(cfg.student.arch)
    reference = Classifier(arch.build(data.num_classes), arch.preprocessing())
    reference.net.load_state_dict(mine)
    assert results["metrics"]["student_init/top1"] == pytest.approx(top1(reference, data.val_dataloader()), abs=1e-6)


def test_a_pdparams_file_starts_the_student(make_cfg, tmp_path):
    fake = ["data=fake", "data.num_classes=10", "data.train_size=32", "data.val_size=16", "data.batch_size=8"]
    models = ["teacher=resnet8", "teacher.weights=none", "student=resnet50_vd"]
    cfg = make_cfg(*fake, *models, "student.weights=none")
    data = build_data(cfg, cfg.student)
    torch.manual_seed(3)
    arch = instantiate(cfg.student.arch)
    reference = Classifier(arch.build(data.num_classes), arch.preprocessing()).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so their mapping matters
        for module in reference.net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
    path = save_pdparams(paddle_state(reference.net, "current"), tmp_path / "ResNet50_vd_pretrained.pdparams")

    probe, started = start_probe(tmp_path)
    results = fit(make_cfg(*fake, *models, *SHORT, *probe, f"student.weights={path}"), task="distill")
    assert_same_state(load_file(started), reference.net.state_dict())
    assert results["metrics"]["student_init/top1"] == pytest.approx(top1(reference, data.val_dataloader()), abs=1e-6)
