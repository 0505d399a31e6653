"""kd as a library: plain timm/torchvision models and plain TensorDataset loaders, in a user's own code."""

from __future__ import annotations

import copy
import csv
import functools
import json
import runpy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import kd
from kd.data.batches import unpack_batch
from kd.data.digits import DigitsData
from kd.launch.run import run_task
from kd.models import TimmArch, TorchvisionArch
from kd.teachers.cache import CachedTeacher
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"


def tiny(seed: int, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=in_chans)


def loaders(n: int = 32, num_classes: int = 10, size: int = 16) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(n, 3, size, size, generator=generator), torch.randint(0, num_classes, (n,))
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


def trainer(tmp_path: Path, steps: int = 1, **settings) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **settings,
    )  # fmt: skip


# --- the public API -------------------------------------------------------------------------------------------


def test_every_public_name_resolves_with_a_docstring_and_import_kd_stays_cheap():
    for name in kd.__all__:
        value = getattr(kd, name)
        assert name == "__version__" or (value.__doc__ or "").strip(), f"kd.{name} has no docstring"
    code = "import sys, kd; print(sorted(m for m in ('torch', 'lightning', 'hydra', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_as_classifier_takes_timm_and_torchvision_preprocessing_as_kd_configs_do():
    gray = kd.as_classifier(tiny(0, in_chans=1))
    assert gray.preprocessing == TimmArch("test_resnet", in_chans=1).preprocessing()
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT  # metadata only, nothing is downloaded
    net = kd.as_classifier(torchvision.models.mobilenet_v3_small(num_classes=10), weights=weights)
    assert net.preprocessing == TorchvisionArch("mobilenet_v3_small").preprocessing(weights)
    plain = kd.as_classifier(nn.Conv2d(1, 4, 3), normalized=True, input_size=(1, 8, 8))
    image = torch.rand(1, 1, 8, 8)
    assert torch.equal(plain(image), plain.net(image))  # already normalized: nothing is subtracted


def test_a_network_without_known_preprocessing_is_refused_in_one_sentence():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(kd.KdError, match=r"cannot tell how Sequential expects .*kd\.as_classifier"):
        kd.DistillationModule(net, kd.losses.LabelCrossEntropy(), num_classes=10)
    with pytest.raises(kd.KdError, match="only one of mean and std"):
        kd.as_classifier(net, mean=(0.5, 0.5, 0.5), input_size=(3, 8, 8))
    with pytest.raises(kd.KdError, match="needs input_size"):
        kd.as_classifier(net, normalized=True)


# --- bad input, one sentence each -----------------------------------------------------------------------------


def test_a_teacher_of_another_class_count_is_refused_before_any_work(tmp_path):
    with pytest.raises(kd.KdError, match="the teacher predicts 5 classes but the student 10"):
        kd.DistillationModule(tiny(0), kd.losses.HintonKD(), teacher=tiny(1, num_classes=5))
    train, val = loaders()
    with pytest.raises(kd.KdError, match="the teacher predicts 5 classes but the student 10"):
        kd.distill(tiny(1, num_classes=5), tiny(0), train, val, epochs=1, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_same_network_as_teacher_and_student_is_refused():
    net = tiny(0)
    with pytest.raises(kd.KdError, match="share .* parameter tensors"):
        kd.DistillationModule(net, kd.losses.HintonKD(), teacher=net)
    assert all(p.requires_grad for p in net.parameters())  # refused before the teacher was frozen


def test_an_optimizer_holding_the_teachers_parameters_is_refused_before_the_first_step(tmp_path):
    student, teacher = tiny(0), tiny(1)
    optimizer = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=0.1)  # "train both"
    module = kd.DistillationModule(student, kd.losses.HintonKD(), optimizer, teacher=teacher)
    before = [p.detach().clone() for p in student.parameters()]
    train, _ = loaders()
    with pytest.raises(kd.KdError, match="the optimizer holds .* of the teacher's parameter tensors"):
        trainer(tmp_path).fit(module, train_dataloaders=train)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"image": torch.rand(2, 3, 8, 8)}, r"must be \(images, labels\)"),
        ((torch.rand(2, 8, 8, 3), torch.tensor([0, 1])), "have 8 channels .* but the model takes 3"),
        ((torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1])), "float tensor"),
        ((torch.rand(2, 3, 8, 8), torch.tensor([[0], [1]])), "must be 2 class indices"),
        ((torch.rand(2, 3, 8, 8), torch.tensor([0, 12])), "labels from 0 to 12, outside the 10 classes"),
    ],
)
def test_a_batch_of_the_wrong_shape_is_refused_in_one_sentence(batch, message):
    module = kd.DistillationModule(tiny(0), kd.losses.HintonKD(), teacher=tiny(1))
    with pytest.raises(kd.KdError, match=message):
        module.training_step(batch, 0)
    with pytest.raises(kd.KdError, match=message):
        module.validation_step(batch, 0)


def test_plain_batches_leave_view_ids_out_and_only_the_cache_asks_for_them():
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    assert unpack_batch((images, labels), 3, 10)[2] is None
    view_ids = torch.tensor([[0, 0], [1, 0]])
    assert unpack_batch((images, labels, view_ids), 3, 10)[2] is view_ids
    module = kd.DistillationModule(tiny(0), kd.losses.HintonKD(), teacher=tiny(1))
    module.__dict__["teacher"] = CachedTeacher(module.teacher, store=None)
    with pytest.raises(kd.KdError, match="without view ids; train on a kd data module or without the cache"):
        module.teacher_outputs(images, None, ())


def test_distill_refuses_the_cache_and_unknown_options(tmp_path):
    train, val = loaders()
    with pytest.raises(kd.KdError, match="plain DataLoaders do not yield"):
        kd.distill(tiny(1), tiny(0), train, val, teacher={"cache": str(tmp_path)})
    with pytest.raises(kd.KdError, match="not a valid kd run"):
        kd.distill(tiny(1), tiny(0), train, val, optim="no_such_optimizer")


# --- kd's guarantees in a user's own Trainer ------------------------------------------------------------------


class TouchesTheTeacher(kd.losses.HintonKD):
    """A buggy custom loss: it writes into the teacher's weights."""

    def bind(self, student, teacher):
        self.__dict__["teacher"] = teacher

    def terms(self, student_logits, teacher_logits, target):
        with torch.no_grad():
            next(self.teacher.parameters()).add_(1.0)
        return super().terms(student_logits, teacher_logits, target)


class RecordsLogits(kd.losses.HintonKD):
    def terms(self, student_logits, teacher_logits, target):
        self.__dict__["seen"] = (student_logits.detach(), teacher_logits, target)
        return super().terms(student_logits, teacher_logits, target)


def test_teacher_and_student_see_the_same_mixed_plain_batch():
    """Teacher = a copy of the student, both in eval mode: equal logits prove they got the same input tensor."""
    from kd.data.mixup import BatchMixup

    student = tiny(0)
    loss = RecordsLogits()
    # float32 like the student: the default teacher precision (auto) is bf16 on a CPU that computes it natively
    teacher = kd.FrozenTeacher(kd.as_classifier(copy.deepcopy(student)), precision="32")
    module = kd.DistillationModule(student, loss, teacher=teacher, mixup=BatchMixup(mixup_alpha=1.0))
    module.student.eval()
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    module.training_step((images, labels), 0)
    student_logits, teacher_logits, target = loss.seen
    assert target.shape == (8, 10) and bool((target.max(dim=1).values < 1).all())  # the labels were mixed
    assert torch.allclose(student_logits, teacher_logits, atol=1e-5)
    assert not torch.allclose(teacher_logits, module.teacher(images), atol=1e-3)  # ... and so were the images


def test_a_changed_teacher_fails_the_fit_in_a_users_own_trainer(tmp_path):
    module = kd.DistillationModule(
        tiny(0), TouchesTheTeacher(), functools.partial(torch.optim.SGD, lr=0.1), teacher=tiny(1)
    )
    train, _ = loaders()
    with pytest.raises(kd.KdError, match="the teacher changed during the run"):
        trainer(tmp_path).fit(module, train_dataloaders=train)


@pytest.mark.slow
def test_own_datamodule_example_logs_every_steps_lr_and_keeps_the_teacher_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = runpy.run_path(str(EXAMPLES / "own_datamodule.py"), run_name="__main__")
    module, trainer_ = run["module"], run["trainer"]
    assert trainer_.global_step == 8
    assert not [key for key in module.state_dict() if key.startswith("teacher")]
    assert not any(p.requires_grad for p in run["teacher"].parameters())
    with open(next(tmp_path.glob("logs/**/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    lrs = [float(row["lr-SGD"]) for row in rows if row.get("lr-SGD")]
    assert (
        len(lrs) == 8 and lrs[0] == 0.05 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    )  # cosine, per step


# --- kd.distill -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_notebook_example_writes_the_run_folder_of_run_py(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = runpy.run_path(str(EXAMPLES / "distill_in_notebook.py"), run_name="__main__")
    results, folder = run["results"], tmp_path / "distill-run"
    stored = json.loads((folder / "results.json").read_text())
    assert (
        stored["task"] == "distill" and stored["teacher"] == "test_resnet" and stored["student"] == "test_efficientnet"
    )
    assert stored["metrics"] == results["metrics"] and len(results["history"]) == 3  # before, after epoch 1, 2
    weights = load_file(folder / "student.safetensors")
    trained = run["student"].state_dict()  # the student object itself was trained
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in weights)
    assert (folder / "checkpoints" / "last.ckpt").exists() and (folder / "csv" / "metrics.csv").exists()


@pytest.mark.slow
def test_distill_of_plain_modules_ends_with_the_student_weights_of_the_same_run_py_run(tmp_path, make_cfg):
    """``python run.py`` with a timm student and teacher loaded from files, digits without augmentation (each view
    is the image itself), against ``kd.distill`` of the same networks on a TensorDataset DataLoader whose sampler
    draws kd's order (torch's DistributedSampler with the run seed, epoch set by Lightning): same batches in the
    same order, so every step must be the same, and the final weights equal bit for bit."""
    student_file, teacher_file = tmp_path / "student.safetensors", tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny(0, in_chans=1).state_dict().items()}, student_file)
    save_file({k: v.contiguous() for k, v in tiny(1, in_chans=1).state_dict().items()}, teacher_file)
    timm_arch = "{_target_:kd.models.TimmArch,model_name:test_resnet,in_chans:1}"
    # float32: PyTorch's CPU bf16 convolution returns NaN weight gradients for timm's test_resnet on 8x8 digits (its
    # 3x3 kernels on 1x1 maps), which the default trainer.precision=auto would give here (kd.training.guards.remedy)
    shared = ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "seed=3",
              "trainer.precision=32-true"]  # fmt: skip
    cfg = make_cfg(
        "data.max_shift=0", "logger=none", *shared,
        "~student.arch", f"+student.arch={timm_arch}", f"student.weights={student_file}",
        "~teacher.arch", f"+teacher.arch={timm_arch}", f"teacher.weights={teacher_file}",
    )  # fmt: skip
    run_task(cfg)  # what python run.py does with this command line
    from_run_py = load_file(Path(cfg.paths.output_dir) / "student.safetensors")

    digits = DigitsData(max_shift=0)
    digits.setup()
    train_set = TensorDataset(digits.train_set.images, digits.train_set.labels)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=3)
    train = DataLoader(train_set, batch_size=64, sampler=sampler, drop_last=True)
    val = DataLoader(TensorDataset(digits.val_set.images, digits.val_set.labels), batch_size=64)
    student, teacher = tiny(5, in_chans=1), tiny(6, in_chans=1)
    student.load_state_dict(load_file(student_file))
    teacher.load_state_dict(load_file(teacher_file))
    results = kd.distill(
        teacher,
        student,
        train,
        val,
        seed=3,
        epochs=2,
        trainer={"limit_train_batches": 3, "limit_val_batches": 2, "precision": "32-true"},
    )
    trained = student.state_dict()
    assert from_run_py.keys() == trained.keys()
    assert not torch.equal(from_run_py["fc.weight"], load_file(student_file)["fc.weight"])  # it did train
    assert [k for k in trained if not torch.equal(trained[k], from_run_py[k])] == []
    assert results["metrics"] == json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())["metrics"]


def test_the_docs_show_the_examples_as_they_are_tested():
    api = (ROOT / "docs" / "api.md").read_text()
    section = api.split("## In a notebook", 1)[1].split("\n## What kd guarantees", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    files = [(EXAMPLES / name).read_text() for name in ("distill_in_notebook.py", "own_datamodule.py")]
    assert blocks == files
    assert all(len(text.splitlines()) < 30 for text in files)


def test_the_simplest_call_runs_one_epoch_with_the_default_warmup_fitted_to_it(caplog):
    """The default warmup (1 epoch) would fill a 1-epoch run: it shrinks and says so, the run is not refused."""
    train, val = loaders()
    with caplog.at_level("INFO", logger="kd"):
        results = kd.distill(tiny(1), tiny(0), train, val, loss="kd", epochs=1)
    assert 0.0 <= results["metrics"]["student/top1"] <= 1.0 and results["history"][-1]["epoch"] == 1
    fitted = [r.getMessage() for r in caplog.records if "would cover the whole run" in r.getMessage()]
    assert len(fitted) == 1 and "warming up for 0 steps instead" in fitted[0]  # 4 steps: a tenth rounds down


def test_a_warmup_the_user_set_is_still_refused_when_it_covers_the_run():
    train, val = loaders()
    with pytest.raises(kd.KdError, match=r"^sched.warmup_epochs=1 covers the whole run \(4 of 4 steps\)"):
        kd.distill(tiny(1), tiny(0), train, val, loss="kd", epochs=1, sched={"warmup_epochs": 1})
