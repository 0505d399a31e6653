"""What the teacher sees in training under strong augmentation and mixup: the student's exact tensor (consistent),
the image's fixed view (fixed) or its own seeded view (independent); the cache returns the outputs of that input."""

import numpy as np
import pytest
import torch

from kd.data.digits import DigitsData
from kd.module import DistillationModule
from kd.tasks.train import fit
from kd.teachers.cache import CachedTeacher, decode, encode
from tests.conftest import FAST

STRONG = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25"]
# 2 epochs of 4 steps: epoch 1 reads views (and cache records) that epoch 0 never touched.
SHORT = [*FAST, "trainer.limit_train_batches=4", "sched.warmup_epochs=0", "logger=csv"]


@pytest.fixture
def steps(monkeypatch) -> list[dict]:
    """Per training step: the batch's view ids and images, the student's input, the teacher's input, the logits
    the step used for the teacher (cached or live), and the frozen teacher's own logits on that same input."""
    records: list[dict] = []
    training_step, teacher_outputs = DistillationModule.training_step, DistillationModule.teacher_outputs

    def recording_step(self, batch, batch_idx):
        if self.teacher is None:  # weights=auto pretraining a model on labels
            return training_step(self, batch, batch_idx)
        record = {"epoch": self.current_epoch, "view_ids": batch[2].clone(), "images": batch[0].clone()}
        records.append(record)
        student = self.__dict__["student_forward"]

        def student_forward(images):
            record["student"] = images.detach().clone()
            return student(images)

        self.__dict__["student_forward"] = student_forward
        try:
            return training_step(self, batch, batch_idx)
        finally:
            self.__dict__["student_forward"] = student

    def recording_outputs(self, images, view_ids, stages):
        logits, features = teacher_outputs(self, images, view_ids, stages)
        if self.teacher is None:  # weights=auto pretraining a model on labels
            return logits, features
        live = self.teacher.teacher if isinstance(self.teacher, CachedTeacher) else self.teacher
        with torch.no_grad():
            records[-1] |= {"teacher": images.detach().clone(), "used": logits.detach().clone(),
                            "live": live(images).detach().clone()}  # fmt: skip
        return logits, features

    monkeypatch.setattr(DistillationModule, "training_step", recording_step)
    monkeypatch.setattr(DistillationModule, "teacher_outputs", recording_outputs)
    return records


def assert_cache_is_the_live_teacher(records: list[dict]) -> None:
    """The cached logits are the live teacher's on the very input of the step, up to the cache's float16 storage:
    within 1e-4 of the live logits stored and read back, and within 2e-4 in probability (float16 keeps each logit
    to 2^-11 of its distance to the row's max, which moves a probability p by at most p * d * 2^-11 <= 1.8e-4)."""
    assert {r["epoch"] for r in records} == {0, 1}
    for record in records:
        live, used = record["live"], record["used"]
        stored = decode(encode(live, live.shape[1]), live.shape[1])
        assert (stored - used).abs().max() <= 1e-4, f"epoch {record['epoch']}"
        assert (live.softmax(1) - used.softmax(1)).abs().max() <= 2e-4, f"epoch {record['epoch']}"


@pytest.mark.slow
def test_consistent_teacher_gets_the_students_exact_tensor_and_the_cache_its_outputs(make_cfg, tmp_path, steps):
    cache = tmp_path / "teacher-outputs"
    fit(make_cfg(*SHORT, *STRONG, "mixup=mixup", f"teacher.cache={cache}"), task="distill")
    assert len(steps) == 8
    for record in steps:
        assert torch.equal(record["teacher"], record["student"])  # one tensor: crop, RandAugment, erasing, mixup
        assert not torch.equal(record["student"], record["images"])  # and mixup did change the batch
    assert_cache_is_the_live_teacher(steps)


@pytest.mark.slow
def test_fixed_teacher_sees_each_unaugmented_image_in_every_epoch_from_one_record_per_image(make_cfg, tmp_path, steps):
    cache = tmp_path / "teacher-outputs"
    fit(make_cfg(*SHORT, *STRONG, "teacher.view=fixed", f"teacher.cache={cache}"), task="distill")
    raw = DigitsData()
    raw.setup("fit")
    seen: dict[int, list[torch.Tensor]] = {}
    for record in steps:
        assert not torch.equal(record["teacher"], record["student"])
        for row, index in enumerate(record["view_ids"][:, 0].tolist()):
            seen.setdefault(index, []).append(record["teacher"][row])
            assert torch.equal(record["teacher"][row], raw.train_set.images[index])  # the image, un-augmented
    assert sum(len(inputs) > 1 for inputs in seen.values()) > 10  # images trained on in both epochs
    [store] = [p for p in cache.iterdir() if p.is_dir()]
    assert sorted(p.name for p in store.glob("epoch-*.npy")) == ["epoch-0000.npy"]  # one record per image
    assert_cache_is_the_live_teacher(steps)


@pytest.mark.slow
def test_independent_teacher_view_differs_from_the_students_and_is_rebuilt_from_the_seed(make_cfg, tmp_path, steps):
    cache = tmp_path / "teacher-outputs"
    fit(make_cfg(*SHORT, *STRONG, "mixup=mixup", "teacher.view=independent", f"teacher.cache={cache}"), "distill")
    first = list(steps)
    different = [not torch.equal(r["teacher"][i], r["student"][i]) for r in first for i in range(len(r["teacher"]))]
    assert np.mean(different) > 0.9
    assert_cache_is_the_live_teacher(first)
    steps.clear()
    again = [*SHORT, *STRONG, "mixup=mixup", "teacher.view=independent", f"paths.output_dir={tmp_path / 'again'}"]
    fit(make_cfg(*again), task="distill")  # no cache: the live teacher, views rebuilt from the seed
    assert len(steps) == len(first)
    for ours, theirs in zip(first, steps, strict=True):
        assert torch.equal(ours["teacher"], theirs["teacher"]) and torch.equal(ours["student"], theirs["student"])
