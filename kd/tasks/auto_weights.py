"""``weights: auto``: obtain a model's weights by supervised training on the run's data, once, cached.

The embedded digits default has no published weights, so its teacher and its student are trained
with labels (the same code path as ``task=train``) and stored under ``paths.cache_dir/pretrained``,
keyed by architecture, recipe and data. Later runs reuse the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd.data import ClassificationData
from kd.errors import KdError
from kd.io import write_json_atomic
from kd.losses import LabelCrossEntropy
from kd.models import Classifier
from kd.module import DistillationModule
from kd.students.card import card_for
from kd.students.export import write_safetensors
from kd.training.schedule import warmup_cosine

log = logging.getLogger("kd")

# Data settings that change what the model learns; loader settings (workers) do not, nor do the unlabeled images
# (pretraining trains on the labeled images alone, see kd.data.unlabeled).
DATA_KEYS_IGNORED = ("num_workers", "eval_batch_size", "unlabeled", "unlabeled_ratio")
# Nor the strong augmentation (kd.data.augment): pretraining uses the data's plain views, so the teacher and the
# student of an augmentation sweep are the ones the plain runs use.
DATA_KEYS_IGNORED += ("auto_augment", "re_prob", "re_mode", "re_count", "color_jitter", "scale", "ratio")
# Left out of the key at these values, so weights cached before these settings existed keep their key.
DATA_DEFAULTS_IGNORED = {"labeled_fraction": 1.0, "bad_images": "stop"}


class AutoWeights:
    """``weights: auto`` for one run's data: called with a model config and role, it gives the file of that
    model trained on the data (training it first, once, when no cached file fits)."""

    def __init__(
        self, cache_dir: str | Path, data_cfg: DictConfig, data: ClassificationData, accelerator: str = "auto"
    ) -> None:
        self.folder = Path(cache_dir).expanduser() / "pretrained"
        self.data_cfg = {
            k: v
            for k, v in OmegaConf.to_container(data_cfg, resolve=True).items()
            if k not in DATA_KEYS_IGNORED and not (k in DATA_DEFAULTS_IGNORED and DATA_DEFAULTS_IGNORED[k] == v)
        }
        self.data = data
        self.accelerator = accelerator

    def path_for(self, model_cfg: DictConfig) -> Path:
        recipe = {
            "arch": OmegaConf.to_container(model_cfg.arch, resolve=True),
            "pretrain": OmegaConf.to_container(model_cfg.pretrain, resolve=True),
            "data": self.data_cfg,
            "classes": self.data.num_classes,
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{model_cfg.name}-{key}.safetensors"

    def __call__(self, model_cfg: DictConfig, role: str) -> Path:
        if model_cfg.get("pretrain") is None:
            raise KdError(f"{role}.weights=auto needs a {role}.pretrain recipe; give {role}.weights=FILE instead")
        path = self.path_for(model_cfg)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # parallel sweep jobs train it once, not once each
            if path.is_file():
                log.info(
                    "%s %s: reusing weights trained earlier with task=train, cached at %s", role, model_cfg.name, path
                )
                return path
            top1, seconds = self.train(model_cfg, path)
        log.info(
            "%s %s: no weights given, so trained it with task=train on the training split "
            "(%d epochs, %.0f s, val top-1 %.4f) and cached it at %s",
            role,
            model_cfg.name,
            model_cfg.pretrain.epochs,
            seconds,
            top1,
            path,
        )
        return path

    def train(self, model_cfg: DictConfig, path: Path) -> tuple[float, float]:
        recipe = model_cfg.pretrain
        start = time.perf_counter()
        with torch.random.fork_rng():  # the run's own seed stays untouched
            L.seed_everything(recipe.get("seed", 0), verbose=False)
            arch = instantiate(model_cfg.arch)
            student = Classifier(arch.build(self.data.num_classes), arch.preprocessing())
            module = DistillationModule(
                student,
                LabelCrossEntropy(),
                optimizer=partial(torch.optim.SGD, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay),
                scheduler=partial(warmup_cosine, warmup_epochs=recipe.get("warmup_epochs", 0)),
                num_classes=self.data.num_classes,
            )
            trainer = L.Trainer(
                max_epochs=recipe.epochs,
                accelerator=self.accelerator,
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                check_val_every_n_epoch=recipe.epochs,
            )  # validate once, at the end
            # No unlabeled image, no hidden label, no strong augmentation.
            trainer.fit(module, datamodule=self.data.plain_views().labeled_only())
        top1, seconds = float(trainer.callback_metrics["student/top1"]), time.perf_counter() - start
        write_safetensors(student, card_for(student, self.data, model=model_cfg.name), path)
        write_json_atomic(
            path.with_suffix(".json"),
            {
                "model": model_cfg.name,
                "val_top1": top1,
                "train_seconds": seconds,
                "pretrain": OmegaConf.to_container(recipe),
                "data": self.data_cfg,
            },
        )
        return top1, seconds


def auto_weights(cfg: DictConfig, data: ClassificationData) -> AutoWeights:
    """The ``weights: auto`` source of a run: its cache folder, data and accelerator."""
    return AutoWeights(cfg.paths.cache_dir, cfg.data, data, cfg.trainer.get("accelerator", "auto"))
