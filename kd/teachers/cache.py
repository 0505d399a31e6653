"""Teacher-output cache: the teacher's logits for every training view (epoch, sample), computed once.

Views are seeded by (seed, epoch, sample index) (``kd.data.sampling``), so the view of sample i in
epoch e is the same in every run with the same data, transform and seed, whatever the loss or the
student. The cache stores, per view, the teacher's top-k logits in float16 and is shared by every
run whose manifest matches: a sweep over losses runs the teacher once.

Storage, per (epoch, sample), one record of a NumPy structured array (``epoch-0003.npy``, memory-mapped):

- ``logits``: the k largest logits minus the row's largest one, float16 (the top-1 entry is 0, the
  entries that carry the probability mass are stored with float16's finest steps);
- ``classes``: their class indices; ``max``: the largest logit; ``lse``: logsumexp of all C logits
  (both float32).

Reading back (``decode``): the stored classes get ``max + logits`` (their true logits up to float16
rounding). When k < C, every other class gets the same logit ``lse + log(r / (C - k))`` with
``r = 1 - sum_j exp(stored_j - lse)``: the softmax of the result gives each stored class exactly the
probability its stored logit has in the teacher's full softmax, and spreads the remaining mass r
evenly over the other C - k classes. At a temperature T != 1 the stored classes' tempered
probabilities are exact only when k = C (the default up to 100 classes).

Consistency: the folder's ``manifest.json`` records everything that decides the stored values
(teacher fingerprint, architecture and normalization, data config and content digest, transform,
seeding scheme, seed, k, precision, library versions) and the epochs written so far. A manifest that
does not match the run is never used: the folder is rebuilt. Each epoch file is written to a
temporary file, flushed and renamed into place, and only then listed in the manifest (also written
atomically), so a process killed while writing leaves an epoch that is simply not listed, and is
written again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from kd.errors import KdError
from kd.io import write_atomic, write_json_atomic
from kd.teachers.frozen import FrozenTeacher

log = logging.getLogger("kd")

FORMAT = "kd-teacher-outputs/1"
#: ``cache_topk: auto`` stores every logit up to this many classes, else ``AUTO_TOPK``.
AUTO_ALL_CLASSES = 100
AUTO_TOPK = 10

# Fills one epoch: calls ``write(sample_indices, logits)`` for batches covering every sample once.
EpochFiller = Callable[[int, Callable[[np.ndarray, torch.Tensor], None]], None]


def resolve_topk(topk: int | str | None, num_classes: int) -> int:
    """``auto``: every class up to 100 classes, else 10. An integer is capped at the class count."""
    if topk in (None, "auto"):
        return num_classes if num_classes <= AUTO_ALL_CLASSES else AUTO_TOPK
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise KdError(f"teacher.cache_topk={topk} must be a positive whole number or auto")
    return min(topk, num_classes)


def record_dtype(k: int, num_classes: int) -> np.dtype:
    index = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    return np.dtype([("logits", "<f2", (k,)), ("classes", index, (k,)), ("max", "<f4"), ("lse", "<f4")])


def encode(logits: torch.Tensor, k: int) -> np.ndarray:
    """The stored records of the rows of ``logits`` (batch, classes); see the module docstring."""
    logits = logits.float()
    values, classes = logits.topk(k, dim=1)  # sorted, largest first
    top = values[:, :1]
    half = torch.finfo(torch.float16)
    fields = {
        "logits": (values - top).clamp_min(half.min).to(torch.float16),
        "classes": classes,
        "max": top[:, 0],
        "lse": torch.logsumexp(logits, dim=1),
    }
    records = np.empty(logits.shape[0], dtype=record_dtype(k, logits.shape[1]))
    for name, value in fields.items():
        records[name] = value.cpu().numpy()
    return records


def decode(records: np.ndarray, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Full (batch, classes) float32 logits from stored records; see the module docstring."""

    def field(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(records[name])).to(device, non_blocking=True)

    top = field("logits").float().add_(field("max")[:, None])
    classes = field("classes").long()
    k = classes.shape[1]
    if k == num_classes:
        return torch.empty_like(top).scatter_(1, classes, top)
    lse = field("lse")[:, None]
    stored_mass = torch.exp(top - lse).sum(dim=1, keepdim=True)
    # Float16 rounding can push the stored mass to 1 or past it: keep a finite, negligible tail then.
    rest = (1.0 - stored_mass).clamp_min(torch.finfo(torch.float32).eps * stored_mass)
    tail = lse + torch.log(rest / (num_classes - k))
    return tail.expand(-1, num_classes).clone().scatter_(1, classes, top)


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += differing_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(prefix + key)
    return keys


class TeacherOutputStore:
    """One folder of stored teacher outputs for one identity (see the module docstring)."""

    def __init__(self, folder: str | Path, identity: dict[str, Any], num_samples: int, num_classes: int, k: int):
        self.folder = Path(folder)
        # Normalized through JSON, so it compares equal to the manifest's copy read back later.
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.k = k
        self.dtype = record_dtype(k, num_classes)
        self.layout = {
            "num_samples": num_samples,
            "num_classes": num_classes,
            "k": k,
            "record": {name: str(self.dtype.fields[name][0]) for name in self.dtype.names},
        }
        self._epochs: dict[int, np.ndarray] = {}

    @classmethod
    def under(cls, root: str | Path, name: str, identity: dict[str, Any], **layout: int) -> TeacherOutputStore:
        """The store for ``identity`` inside the cache root: ``<root>/<name>-<hash of identity>``."""
        return cls(Path(root).expanduser() / f"{name}-{identity_key(identity)}", identity, **layout)

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.npy"

    def _open_epoch(self, epoch: int) -> np.ndarray | None:
        try:
            records = np.load(self.epoch_path(epoch), mmap_mode="r")
        except (OSError, ValueError):  # missing, or truncated below its header's size
            return None
        return records if records.dtype == self.dtype and records.shape == (self.num_samples,) else None

    def _read_manifest(self) -> dict | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("teacher outputs: unreadable manifest %s, rebuilding the cache", self.manifest_path)
            return None
        same = (manifest.get("format"), manifest.get("identity"), manifest.get("layout"))
        if same == (FORMAT, self.identity, self.layout):
            return manifest
        differ = differing_keys(manifest.get("identity") or {}, self.identity) or ["format or layout"]
        log.warning("teacher outputs: %s was written for another setup (%s differ), rebuilding it", self.folder, differ)
        return None

    def _write_manifest(self, epochs: Iterable[int]) -> None:
        manifest = {"format": FORMAT, "identity": self.identity, "layout": self.layout, "epochs": sorted(epochs)}
        write_json_atomic(self.manifest_path, manifest, "teacher-output cache manifest")

    def complete_epochs(self) -> list[int]:
        """Epochs listed by a matching manifest whose files are whole; a stale manifest is removed.
        Call it under the folder's lock (``ensure`` does)."""
        manifest = self._read_manifest()
        if manifest is None:
            if self.manifest_path.exists():
                self._reset()
            return []
        complete = []
        for epoch in manifest.get("epochs", []):
            records = self._open_epoch(epoch)
            if records is None:
                log.warning("teacher outputs: %s is damaged, writing it again", self.epoch_path(epoch))
                continue
            self._epochs[epoch] = records
            complete.append(epoch)
        return complete

    def _reset(self) -> None:
        self._epochs.clear()
        self.manifest_path.unlink(missing_ok=True)  # first, so no partial state ever looks valid
        for path in self.folder.glob("epoch-*.npy"):
            path.unlink()

    def ensure(self, epochs: Iterable[int], fill: EpochFiller, every_sample: bool = True) -> list[int]:
        """Makes every epoch in ``epochs`` available, writing the missing ones; returns those written.
        ``every_sample``: the filler writes every sample of an epoch (with mixup, only those a training batch
        holds: the samples a short last batch would get are never trained on and stay unset).

        A file lock beside the folder makes parallel sweep jobs (or DDP ranks) write each epoch once:
        the first one writes, the others wait and then read.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder) + ".lock"):
            for leftover in self.folder.glob(".*.tmp"):  # from a writer that was killed
                leftover.unlink()
            complete = set(self.complete_epochs())
            missing = sorted(set(epochs) - complete)
            for epoch in missing:
                start = time.perf_counter()
                write = lambda tmp, e=epoch: self._write_epoch(tmp, e, fill, every_sample)  # noqa: E731
                write_atomic(self.epoch_path(epoch), write, "teacher-output cache epoch")
                complete.add(epoch)
                self._write_manifest(complete)
                self._epochs[epoch] = self._open_epoch(epoch)
                log.info(
                    "teacher outputs: wrote epoch %d (%d views, %.1f s) to %s",
                    epoch,
                    self.num_samples,
                    time.perf_counter() - start,
                    self.folder,
                )
        return missing

    def _write_epoch(self, tmp: Path, epoch: int, fill: EpochFiller, every_sample: bool) -> None:
        records = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(self.num_samples,))
        records["max"] = np.nan  # marks a record no batch wrote; a lookup of one is a kd bug, see _records
        written = np.zeros(self.num_samples, dtype=bool)

        def write(indices: np.ndarray, logits: torch.Tensor) -> None:
            if not torch.isfinite(logits).all():
                raise KdError(
                    f"the teacher gave non-finite logits for a view of epoch {epoch} (samples {indices[:4]}...); "
                    "check the teacher weights, or use trainer.precision=32-true"
                )
            records[indices] = encode(logits, self.k)
            written[indices] = True

        fill(epoch, write)
        if every_sample and not written.all():
            raise RuntimeError(f"epoch {epoch}: {int((~written).sum())} samples were never written")  # a kd bug
        records.flush()

    def lookup(self, view_ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Full teacher logits for a batch's ``view_ids`` ((batch, 2): sample index, epoch)."""
        ids = view_ids.cpu().numpy()
        indices, epochs = ids[:, 0], ids[:, 1]
        if (epochs == epochs[0]).all():  # the usual case: a batch comes from one epoch
            records = self._records(int(epochs[0]))[indices]
        else:
            records = np.empty(len(ids), dtype=self.dtype)
            for epoch in np.unique(epochs):
                rows = epochs == epoch
                records[rows] = self._records(int(epoch))[indices[rows]]
        if np.isnan(records["max"]).any():  # cheap, and it would otherwise train on garbage
            missing = indices[np.isnan(records["max"])][:4].tolist()
            raise RuntimeError(f"teacher outputs: samples {missing} of this batch were never stored")  # a kd bug
        return decode(records, self.num_classes, device)

    def _records(self, epoch: int) -> np.ndarray:
        records = self._epochs.get(epoch)
        if records is None:
            if epoch < 0:
                raise KdError(
                    "this training batch was loaded without seeded views (a sampler replaced by Lightning, e.g. "
                    "trainer.overfit_batches), so teacher.cache cannot look it up; use teacher.cache=null"
                )
            raise KdError(
                f"the teacher-output cache {self.folder} has no epoch {epoch} (it has {sorted(self._epochs)}); "
                "fill it with task=cache_teacher task.epochs=N or start the run again"
            )
        return records


class CachedTeacher(nn.Module):
    """A frozen teacher whose training outputs come from a ``TeacherOutputStore``.

    ``lookup(view_ids)`` (the training step) reads the stored logits of those views and never runs the
    network; ``teacher(images)`` (validation, evaluation) runs the real teacher. Stored are logits only:
    feature losses are refused with a cache (``kd.teachers.fill.check_teacher_cache``).
    """

    def __init__(self, teacher: FrozenTeacher, store: TeacherOutputStore) -> None:
        super().__init__()
        self.teacher = teacher
        self.store = store

    @property
    def start_fingerprint(self) -> str:
        return self.teacher.start_fingerprint

    @property
    def preprocessing(self):
        return self.teacher.preprocessing

    def feature_info(self) -> list[dict]:
        return self.teacher.feature_info()

    @property
    def live(self) -> FrozenTeacher:
        """The teacher that runs the network (validation, metrics), not the store."""
        return self.teacher

    def check_unchanged(self) -> str:
        return self.teacher.check_unchanged()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    def forward_with_features(
        self, images: torch.Tensor, stages: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.teacher.forward_with_features(images, stages)

    def lookup(self, view_ids: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """The stored logits of the training views ``view_ids`` ((batch, 2): sample index, epoch)."""
        return self.store.lookup(view_ids, device)
