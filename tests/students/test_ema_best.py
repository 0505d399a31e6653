"""student.ema=true keeps timm's moving average of the student's weights; results.json and the sweep summary
report the last epoch, the best epoch or the average."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import load_file

from kd.errors import KdError
from kd.results.best import best_record
from kd.summary import main as summary_main
from kd.summary import write_summary
from kd.tasks.train import fit
from kd.training.resume import check_student
from tests.conftest import FAST

DECAY = 0.9  # small, so that 44 steps move the average well away from the student and from its start
EMA = ["student.ema=true", f"student.ema_decay={DECAY}", "student.measure_speed=false"]


class RecordWeights(L.Callback):
    """The student's weights after every optimizer step, and what the optimizer holds (``+callbacks.record``)."""

    runs: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        optimized = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        ema = {id(p) for p in pl_module.student_ema.parameters()}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.run = {"steps": [], "ema_in_optimizer": len(optimized & ema), "optimized": optimized == trainable}
        self.run["student_in_optimizer"] = {id(p) for p in pl_module.student.parameters()} <= optimized
        RecordWeights.runs.append(self.run)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.student.net.state_dict().items()}
        self.run["steps"].append((trainer.global_step, weights))


class CopyCheckpoint(L.Callback):
    """Keeps a copy of last.ckpt as it was after step 9 (mid-epoch), for a resume from there."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 9:  # the checkpoint of step 9 was written at the end of the previous batch
            folder = Path(trainer.default_root_dir) / "checkpoints"
            shutil.copy(folder / "last.ckpt", folder.parent.parent / "mid.ckpt")


def independent_ema(steps: list[tuple[int, dict]], decay: float) -> dict[str, torch.Tensor]:
    """timm train.py's schedule written out: update 1 copies the student, each later one keeps ``decay``."""
    assert [step for step, _ in steps] == list(range(1, len(steps) + 1))  # one record per optimizer step
    average = {k: v.double() for k, v in steps[0][1].items()}
    for _, weights in steps[1:]:
        for k, v in weights.items():
            average[k] = decay * average[k] + (1 - decay) * v.double() if v.is_floating_point() else v
    return average


def test_the_average_follows_every_optimizer_step_and_is_never_trained(make_cfg, tmp_path):
    RecordWeights.runs.clear()
    cfg = make_cfg(*FAST, *EMA, "+callbacks.record._target_=tests.students.test_ema_best.RecordWeights")
    results = fit(cfg, task="distill")
    [run] = RecordWeights.runs
    assert run["ema_in_optimizer"] == 0 and run["optimized"] and run["student_in_optimizer"]
    assert len(run["steps"]) == 44
    exported = load_file(str(tmp_path / "out" / "student_ema.safetensors"))
    expected = independent_ema(run["steps"], DECAY)
    final_student = run["steps"][-1][1]
    assert exported.keys() == expected.keys()
    moved = 0.0
    for key, value in expected.items():
        torch.testing.assert_close(exported[key].to(value.dtype), value, rtol=1e-5, atol=1e-6, msg=key)
        if value.is_floating_point():
            moved = max(moved, (exported[key] - final_student[key]).abs().max().item())
    assert moved > 1e-3  # the average is not the student itself
    assert json.loads((tmp_path / "out" / "student_ema.json").read_text())["model"] == "digits_student"
    metrics = results["metrics"]
    assert {"student_ema/top1", "student_ema/top5", "student/top1"} <= metrics.keys()
    assert results["ema_decay"] == DECAY
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["best"] == best_record(written["history"]) and written["best"]["epoch"] in (1.0, 2.0)


def test_a_bad_decay_is_refused_before_any_work(make_cfg, tmp_path):
    for decay in ("1.0", "0", "-0.5", "abc"):
        with pytest.raises(KdError, match=f"student.ema_decay={decay}|student.ema_decay='{decay}'"):
            fit(make_cfg(*FAST, "student.ema=true", f"student.ema_decay={decay}"), task="distill")
        assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_best_record_is_the_highest_top1_during_training_earliest_on_ties():
    history = [
        {"epoch": 0, "step": 0, "student/top1": 0.99},  # before training: never the best
        {"epoch": 1.0, "step": 10, "student/top1": 0.5, "student/top5": 0.9},
        {"epoch": 2.0, "step": 20, "student/top1": 0.7, "student/top5": 0.8},
        {"epoch": 3.0, "step": 30, "student/top1": 0.6},
        {"epoch": 4.0, "step": 40, "student/top1": 0.7},
    ]
    assert best_record(history) == {"epoch": 2.0, "step": 20, "student/top1": 0.7, "student/top5": 0.8}
    assert best_record(history[:1]) is None


@pytest.mark.slow
def test_a_resume_from_a_mid_epoch_checkpoint_continues_the_same_average(make_cfg, tmp_path):
    every = [
        "callbacks.checkpoint.every_n_train_steps=3",
        "+callbacks.copy._target_=tests.students.test_ema_best.CopyCheckpoint",
    ]
    alone = fit(make_cfg(*FAST, *EMA, *every), task="distill")
    assert (tmp_path / "mid.ckpt").is_file()
    assert torch.load(tmp_path / "mid.ckpt", weights_only=True)["global_step"] == 9
    final_alone = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ema_alone = load_file(str(tmp_path / "out" / "student_ema.safetensors"))
    again = [f"ckpt_path={tmp_path / 'mid.ckpt'}", f"paths.output_dir={tmp_path / 'again'}"]
    resumed_cfg = make_cfg(*FAST, *EMA, every[0], *again)  # the same checkpointing as the run it continues
    resumed = fit(resumed_cfg, task="distill")
    final_resumed = torch.load(tmp_path / "again" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ema_keys = [k for k in final_alone if k.startswith("student_ema.")]
    assert ema_keys
    for key in ema_keys:
        assert torch.equal(final_alone[key], final_resumed[key]), key
    for key, value in load_file(str(tmp_path / "again" / "student_ema.safetensors")).items():
        assert torch.equal(value, ema_alone[key]), key
    assert resumed["metrics"]["student_ema/top1"] == alone["metrics"]["student_ema/top1"]


def write_job(folder: Path, seed: int, top1: float, best: float, ema: float, published: bool = True) -> None:
    folder.mkdir(parents=True)
    results = {
        "task": "distill",
        "seed": seed,
        "metrics": {"student/top1": top1, "student_ema/top1": ema, "student/top5": 0.9},
        "best": {"epoch": 3.0, "step": 30, "student/top1": best, "student/top5": 0.95},
        "overrides": [f"seed={seed}", "loss=kd"],
        "wall_time_s": 1.0,
    }
    if published:
        results["published"] = {"top1": 73.33, "source": "CRD Table 1"}
    (folder / "results.json").write_text(json.dumps(results))


def summary_row(markdown: str) -> dict[str, str]:
    header, _, row = (line for line in markdown.splitlines() if line.startswith("|"))
    return dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | "), strict=True))


def test_the_summary_reports_last_best_or_ema_and_the_published_top1(tmp_path, capsys):
    write_job(tmp_path / "0", 0, top1=0.70, best=0.72, ema=0.74)
    write_job(tmp_path / "1", 1, top1=0.72, best=0.74, ema=0.76)
    last = write_summary(tmp_path)
    row = summary_row(last.markdown)
    assert row["student top-1 %"].strip() == "71.00 ± 1.41"
    assert row["published top-1 %"].strip() == "73.33"
    assert row["Δ top-1 vs published (points)"].strip() == "-2.33"
    assert "metrics after the last epoch (report=last)" in last.markdown
    best = summary_row(write_summary(tmp_path, "best").markdown)
    assert best["student top-1 %"].strip() == "73.00 ± 1.41" and best["student top-5 %"].strip() == "95.00 ± 0.00"
    assert best["Δ top-1 vs published (points)"].strip() == "-0.33"
    assert "best_epoch" in (tmp_path / "summary.csv").read_text().splitlines()[0]
    summary_main([str(tmp_path), "--report", "ema"])
    printed = capsys.readouterr().out
    assert summary_row(printed)["student top-1 %"].strip() == "75.00 ± 1.41" and "(report=ema)" in printed
    assert "(report=ema)" in (tmp_path / "summary.md").read_text()
    with pytest.raises(KdError, match="report='mean'"):
        write_summary(tmp_path, "mean")


def test_the_summary_has_no_published_column_without_a_published_block(tmp_path):
    write_job(tmp_path / "0", 0, top1=0.70, best=0.72, ema=0.74, published=False)
    assert "published" not in write_summary(tmp_path).markdown


def test_a_resume_that_switches_the_average_on_or_off_is_refused_in_one_sentence(tmp_path):
    student = torch.nn.Module()
    student.student = torch.nn.Linear(2, 2)
    with_ema = torch.nn.Module()
    with_ema.student, with_ema.student_ema = student.student, torch.nn.Module()
    with_ema.student_ema.module = torch.nn.Linear(2, 2)
    checkpoint = {"state_dict": with_ema.state_dict()}
    with pytest.raises(KdError, match="written with student.ema=true, but this run sets the opposite"):
        check_student(checkpoint, tmp_path / "last.ckpt", student)
    with pytest.raises(KdError, match="written with student.ema=false"):
        check_student({"state_dict": student.state_dict()}, tmp_path / "last.ckpt", with_ema)
    check_student(checkpoint, tmp_path / "last.ckpt", with_ema)


def test_the_sweep_callback_takes_its_report_from_the_config(make_cfg):
    cfg = make_cfg("hydra.callbacks.sweep_summary.report=best")
    assert instantiate(cfg.hydra.callbacks.sweep_summary).report == "best"
    assert make_cfg().hydra.callbacks.sweep_summary.report == "last"
    with pytest.raises(InstantiationException, match="report='ema2' is not one of last, best, ema"):  # Hydra wraps it
        instantiate(make_cfg("hydra.callbacks.sweep_summary.report=ema2").hydra.callbacks.sweep_summary)
