"""trainer=ddp_cpu: two gloo processes started by Lightning from run.py, measured against one process."""

import json

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate

from kd.errors import KdError
from kd.tasks.checks import check_distributed_launch
from kd.tasks.common import run_precision
from tests.conftest import run_cli

# Random models (no weights=auto training needed): the point is the distributed machinery, not accuracy.
# 359 validation images: an odd count, so a padding sampler would count one image twice on 2 processes.
SETUP = ["teacher.weights=none", "student.weights=none", "data.val_fraction=0.1995"]


@pytest.mark.slow
def test_ddp_cpu_validates_every_image_once_and_only_rank_zero_writes(tmp_path, cache_dir):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    result = run_cli(*SETUP, "task=eval", cwd=single, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "sched.warmup_epochs=0"]
    result = run_cli(*SETUP, "trainer=ddp_cpu", *short, cwd=ddp, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    alone, shared = (json.loads((folder / "results.json").read_text()) for folder in (single, ddp))
    assert alone["world_size"] == 1 and shared["world_size"] == 2
    # The same teacher and student before training, validated on the same 359 images: the same counts, exactly.
    for key in ("teacher/top1", "teacher/top5", "student/top1", "student/top5"):
        value = shared["metrics"][key.replace("student/", "student_init/")]
        assert value == alone["metrics"][key], key
        assert value == pytest.approx(round(value * 359) / 359, abs=1e-6), key  # a count out of 359, not 360

    # Lightning started rank 1 as run.py in the same folder (its log: train_ddp_process_1.log).
    rank0, rank1 = (ddp / "run.log").read_text(), (ddp / "train_ddp_process_1.log").read_text()
    for log, rank in ((rank0, 1), (rank1, 2)):
        assert "teacher on cpu, outside DistributedDataParallel" in log and f"process {rank} of 2" in log
    assert "results written to" in rank0 and "results written to" not in rank1
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt"]
    checkpoint = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("teacher") for key in checkpoint["state_dict"])
    assert not (ddp / "outputs").exists() and not (tmp_path / "outputs").exists()  # rank 1 made no folder of its own


def test_ddp_inside_a_local_multirun_is_refused(make_cfg):
    def check(mode: RunMode) -> None:
        cfg = make_cfg("trainer=ddp_cpu")
        cfg.hydra.mode = mode
        trainer = instantiate(cfg.trainer, precision=run_precision(cfg))  # constructing a Trainer starts no process
        HydraConfig.instance().set_config(cfg)
        check_distributed_launch(trainer)

    try:
        with pytest.raises(KdError, match="trainer.strategy=ddp with 2 processes cannot run inside a local multirun"):
            check(RunMode.MULTIRUN)
        check(RunMode.RUN)  # a single run is fine: Lightning restarts run.py once per extra process
    finally:
        HydraConfig.instance().cfg = None
