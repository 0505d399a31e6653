"""A full disk: a write that fails (ENOSPC, or any OSError) stops with one sentence naming the file and the cause,
keeps the previous file whole and leaves no half-written one. The failure is made by patching ``os.replace``
(the rename that publishes a finished file) or the writer itself."""

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import load_file

from kd.errors import WriteError
from kd.io import write_atomic, write_json_atomic
from kd.launch.run import user_error
from kd.students.card import card_for
from kd.students.export import export_student
from kd.tasks.common import build_data
from kd.tasks.models import build_student
from kd.tasks.records import write_results
from kd.training.resume import AtomicCheckpointIO, Checkpoint

FULL = "No space left on device"


def disk_full_at(monkeypatch, name: str, after: int = 0) -> None:
    """``os.replace`` onto a file called ``name`` fails with ENOSPC, after ``after`` successful ones."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            calls.append(dst)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_a_failed_write_keeps_the_previous_file_and_names_the_file_and_cause(tmp_path, monkeypatch):
    path = tmp_path / "notes.json"
    write_json_atomic(path, {"version": 1})
    disk_full_at(monkeypatch, "notes.json")
    with pytest.raises(WriteError) as refused:
        write_json_atomic(path, {"version": 2}, "notes file")
    assert str(refused.value).startswith(f"could not write the notes file {path} ({FULL}); free space there")
    assert path.read_text() == '{\n  "version": 1\n}\n' and not left_over(tmp_path)

    def half_then_full(tmp: Path) -> None:  # the disk fills up in the middle of the write itself
        tmp.write_text('{"vers')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=rf"^could not write the file {path} \({FULL}\)"):
        write_atomic(path, half_then_full)
    assert path.read_text() == '{\n  "version": 1\n}\n' and not left_over(tmp_path)


def test_results_json_and_the_students_weights_survive_a_full_disk(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("student.weights=none")
    out = tmp_path / "run"
    write_results(out, cfg, "distill", metrics={"student/top1": 0.5})
    before = (out / "results.json").read_bytes()
    data = build_data(cfg, cfg.student)
    student = build_student(cfg.student, data.num_classes)
    card = card_for(student, data, model="digits_student")
    export_student(student, card, out, ["safetensors"])
    weights = load_file(out / "student.safetensors")
    with torch.no_grad():
        next(student.parameters()).add_(1.0)  # the run went on: newer weights that cannot be written

    disk_full_at(monkeypatch, "results.json")
    with pytest.raises(WriteError, match=rf"^could not write the results file {out}/results.json \({FULL}\)"):
        write_results(out, cfg, "distill", metrics={"student/top1": 0.9})
    disk_full_at(monkeypatch, "student.safetensors")
    with pytest.raises(WriteError, match=rf"^could not write the student weights {out}/student.safetensors \({FULL}"):
        export_student(student, card, out, ["safetensors"])
    assert (out / "results.json").read_bytes() == before
    kept = load_file(out / "student.safetensors")
    assert all(torch.equal(kept[key], weights[key]) for key in weights) and not left_over(out)


def test_a_checkpoint_that_cannot_be_written_stops_training_and_keeps_the_last_one(tmp_path, monkeypatch):
    """Lightning's fit with kd's Checkpoint and atomic writer: the third last.ckpt hits a full disk."""
    folder = tmp_path / "checkpoints"
    disk_full_at(monkeypatch, "last.ckpt", after=2)  # steps 2 and 4 are written, step 6 is not
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[Checkpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(Exception) as stopped:
        trainer.fit(BoringModel())
    problem = user_error(stopped.value)
    assert problem is not None and str(problem).startswith(f"could not write the checkpoint {folder}/last.ckpt (")
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # the previous one, whole
    assert trainer.global_step == 6 and not left_over(tmp_path)
