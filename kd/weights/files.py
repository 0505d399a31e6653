"""Weight files: torch (``.pth``, ``.pt``), Lightning / kd / CRD checkpoints (``.ckpt``), ``.safetensors``.

Every damaged or foreign file stops the run with one sentence saying what is wrong with it. Loading is
strict: every key must match in name and shape, except the final classifier when the dataset has another
number of classes; that one is re-initialized and the caller is told.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from kd.errors import KdError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
CHECKPOINT_KEY = "kd_student_card"  # a student's card (kd.students.card) in Lightning checkpoints
METADATA_KEY = "kd_student_card"  # ... and in the string metadata of .safetensors files


def check_exists(path: Path) -> None:
    if not path.is_file():
        raise KdError(f"weights file {path} does not exist; pass an existing file or a timm tag")
    if path.stat().st_size == 0:
        raise KdError(f"weights file {path} is empty; pass a complete weights file")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the network weights from a file, taking the student's out of a kd/Lightning checkpoint."""
    path = Path(path).expanduser()
    check_exists(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError for any damage
            raise KdError(f"weights file {path} is corrupt ({str(error)[:120]}); copy or save it again") from None
    check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(error)):
            raise KdError(
                f"weights file {path} holds Python objects besides tensors ({found[1]}: a whole pickled model?); "
                "save model.state_dict() instead"
            ) from None
        raise KdError(
            f"weights file {path} is corrupt (not a readable torch.save pickle); copy or save it again"
        ) from None
    except Exception as error:  # garbage makes torch's unpickler fail in many ways (IndexError, RuntimeError, ...)
        first_line = (str(error).splitlines() or [""])[0][:120]
        raise KdError(
            f"weights file {path} is corrupt ({type(error).__name__}: {first_line}); copy or save it again"
        ) from None
    return unwrap_state_dict(state, path)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data it describes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or header_size > 100_000_000:
            raise KdError(f"weights file {path} is not a safetensors file (no valid header); pass a .safetensors file")
        if size < 8 + header_size:
            raise KdError(
                f"weights file {path} is truncated ({size} bytes, its header alone needs {8 + header_size}); "
                "copy or save it again"
            )
        try:
            header = json.loads(f.read(header_size))
        except (ValueError, UnicodeDecodeError):
            raise KdError(f"weights file {path} is corrupt (unreadable header); copy or save it again") from None
    needed = 8 + header_size + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < needed:
        raise KdError(f"weights file {path} is truncated ({size} of {needed} bytes); copy or save it again")


def check_torch_file(path: Path) -> None:
    """torch.save writes a zip archive; one cut short has lost its central directory at the end."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise KdError(f"weights file {path} is truncated (a zip archive without its end record); copy or save it again")


def unwrap_state_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]  # Lightning checkpoint
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # common training-script checkpoint (CRD, mdistiller)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdError(f"weights file {path} holds no state dict of tensors; save model.state_dict() instead")
    for prefix in ("student.net.", "net.", "module."):
        if any(key.startswith(prefix) for key in state):
            # A kd checkpoint also holds loss-side modules (feature adapters): keep the student's keys only.
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def load_into(net: nn.Module, state: dict[str, torch.Tensor], classifier: tuple[str, ...], source: str) -> bool:
    """Load ``state`` into ``net`` strictly; returns True when the classifier had to be replaced."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)

    def in_classifier(key: str) -> bool:
        return key.startswith(classifier)

    classifier_left_out = [k for k in unexpected if in_classifier(k)]
    if classifier_left_out and not any(in_classifier(k) for k in own):
        # Built without a classifier (timm's num_classes=0, an embedding teacher): its weights load without theirs,
        # as timm loads pretrained weights into such a model.
        state = {k: v for k, v in state.items() if k not in classifier_left_out}
        unexpected = [k for k in unexpected if k not in classifier_left_out]
        log.info("%s: left out its classifier (%s), since the model has none", source, classifier_left_out[0])
    replace_head = bool(mismatched) and all(in_classifier(k) for k in mismatched)
    if replace_head:
        state = {k: v for k, v in state.items() if not in_classifier(k)}
        missing = [k for k in missing if not in_classifier(k)]
        mismatched = []
    problems = [
        f"{label} {keys[0]}{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}"  # one short line
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch in", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]),
        )
        if keys
    ]
    if problems:
        raise KdError(
            f"weights {source} do not fit this architecture ({'; '.join(problems)}); "
            "pass weights saved from the same architecture"
        )
    net.load_state_dict(state, strict=not replace_head)
    return replace_head


def read_stored_card(weights: str | Path) -> dict | None:
    """The student card stored with a weights file, as a dict: in a Lightning checkpoint, a .safetensors
    header or a ``<stem>.json`` beside the file; None when there is none."""
    path = Path(weights).expanduser()
    if not path.is_file():
        return None
    card = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(METADATA_KEY)
        card = json.loads(stored) if stored else None
    elif path.suffix in TORCH_SUFFIXES:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not ours to judge here: read_state_dict reports unreadable files clearly
            return None
        card = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    sidecar = path.with_suffix(".json")
    if card is None and sidecar.is_file():
        stored = json.loads(sidecar.read_text())
        card = stored if isinstance(stored, dict) and "class_names" in stored else None
    return card or None
