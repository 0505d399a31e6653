"""benchmarks/gpu.py runs its whole code path on a CPU with tiny models, and refuses clearly without CUDA."""

import json
import logging
import sys
import warnings

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402

QUIETED = ("lightning", "lightning.pytorch", "lightning.fabric", "kd", "kd.models.build")


@pytest.fixture(autouse=True)
def benchmark_quiet_stays_in_this_file():
    """The benchmark, run in this process, quiets kd's logs and all warnings for its JSON (throughput.quiet):
    the tests after these must see both as before."""
    levels = {name: logging.getLogger(name).level for name in QUIETED}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_the_gpu_benchmark_runs_kd_and_the_hand_loop_in_both_memory_formats_on_a_cpu(capsys):
    tiny = ["--device", "cpu", "--teacher", "resnet8", "--student", "resnet8", "--image-size", "16", "--batch-size=4"]
    assert gpu.main([*tiny, "--steps", "2", "--warmup", "1", "--no-compile", "--precisions", "32-true"]) == 0
    result = json.loads(capsys.readouterr().out)
    runs = {(r["runner"], r["channels_last"], r["compile"]): r for r in result["runs"]}
    runners = ("kd", "hand", "torchdistill") if gpu.PEER_INSTALLED else ("kd", "hand")
    assert set(runs) == {(runner, cl, False) for runner in runners for cl in (True, False)}
    assert all(r["images_per_s"] > 0 for r in runs.values()) and not result["skipped"]
    assert set(result["kd_vs_hand"]) == {"32-true cl=True compile=False", "32-true cl=False compile=False"}
    assert result["kd_vs_hand"]["32-true cl=True compile=False"] == round(
        runs[("kd", True, False)]["images_per_s"] / runs[("hand", True, False)]["images_per_s"], 3
    )
    if gpu.PEER_INSTALLED:
        assert set(result["kd_vs_torchdistill"]) == set(result["kd_vs_hand"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the benchmark itself")
def test_without_cuda_the_gpu_benchmark_says_so_in_one_sentence(capsys):
    assert gpu.main([]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "needs a CUDA GPU" in out
