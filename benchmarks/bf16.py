"""What bf16 changes on this machine: the digits teacher's own accuracy, and a student's train step time. Not a test.

    python benchmarks/bf16.py teacher                    # digits teacher (weights=auto): float32 vs bf16 autocast
    python benchmarks/bf16.py student resnet18 resnet50d # timm train step, batch 32 at 64 px, channels-last

``teacher``: the default digits teacher (trained once and cached, as ``python run.py`` does) as
``FrozenTeacher(precision="32")`` and ``precision="bf16"`` on the 360 validation images: top-1 of each, the share of
images with the same prediction, the largest logit difference and the KL divergence of their softmaxes at T=4.
``student``: float32 against bf16 autocast, 4 untimed steps then 7 pairs of steps, alternating which goes first; the
median step time of each and the median of the per-pair ratios. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def teacher(cache_dir: str) -> dict:
    from hydra import compose, initialize_config_dir

    from kd.launch.configs import CONF_DIR, register_models
    from kd.tasks.auto_weights import auto_weights
    from kd.tasks.common import build_data
    from kd.tasks.models import build_teacher
    from kd.teachers import FrozenTeacher

    register_models()
    overrides = [f"paths.cache_dir={cache_dir}", "paths.output_dir=."]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    data = build_data(cfg, cfg.student)
    model = build_teacher(cfg, data.num_classes, auto_weights(cfg, data)).model
    images, labels = map(torch.cat, zip(*[(b[0], b[1]) for b in data.val_dataloader()], strict=True))
    logits = {p: FrozenTeacher(model, precision=p)(images) for p in ("32", "bf16")}
    kl = F.kl_div(logits["bf16"].div(4).log_softmax(1), logits["32"].div(4).log_softmax(1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    return {
        "top1": {p: (z.argmax(1) == labels).float().mean().item() for p, z in logits.items()},
        "same_prediction": (logits["32"].argmax(1) == logits["bf16"].argmax(1)).float().mean().item(),
        "max_abs_logit_diff": (logits["32"] - logits["bf16"]).abs().max().item(),
        "kl_T4": kl.item(),
        "images": len(labels),
    }


def train_step(model: torch.nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def student(names: list[str]) -> dict:
    import timm

    torch.manual_seed(0)
    result = {}
    for name in names:
        model = timm.create_model(name, num_classes=100).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        batch = (torch.rand(32, 3, 64, 64).contiguous(memory_format=torch.channels_last), torch.randint(0, 100, (32,)))
        for bf16 in (False, True, False, True):
            train_step(model, optimizer, *batch, bf16)
        pairs = []
        for index in range(7):
            order = (False, True) if index % 2 == 0 else (True, False)
            times = {bf16: train_step(model, optimizer, *batch, bf16) for bf16 in order}
            pairs.append((times[False], times[True]))
        result[name] = {
            "fp32_ms": round(1000 * statistics.median(p[0] for p in pairs), 1),
            "bf16_ms": round(1000 * statistics.median(p[1] for p in pairs), 1),
            "speedup": round(statistics.median(p[0] / p[1] for p in pairs), 3),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["teacher", "student"])
    parser.add_argument("models", nargs="*", default=["resnet18", "resnet50d"])
    parser.add_argument("--cache-dir", default=os.environ.get("KD_CACHE_DIR", str(Path.home() / ".cache" / "kd")))
    args = parser.parse_args(argv)
    result = teacher(args.cache_dir) if args.what == "teacher" else student(args.models)
    print(json.dumps({**result, "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
