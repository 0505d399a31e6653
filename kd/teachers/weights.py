"""Weight sources: a timm tag, a local file (.pth/.pt/.ckpt/.safetensors), or none.

Loading is strict: every key must match in name and shape, except the final classifier when the
dataset has another number of classes; that one is re-initialized and the caller is told.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kd.errors import KdError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
NO_WEIGHTS = (None, "", "none", "null")


def is_local_file(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or "/" in source or source.startswith(".")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the network weights from a file, taking the student's out of a kd/Lightning checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdError(f"weights file {path} does not exist; pass an existing file or a timm tag")
    if path.stat().st_size == 0:
        raise KdError(f"weights file {path} is empty; pass a complete weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # garbage makes torch.load/safetensors fail in many ways (IndexError, SafetensorError)
        raise KdError(
            f"weights file {path} cannot be read ({type(error).__name__}); it is truncated or "
            "not a weights file, so pass a .pth/.pt/.ckpt/.safetensors file saved by torch"
        ) from None
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]  # Lightning checkpoint
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # common training-script checkpoint
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

    replace_head = bool(mismatched) and all(in_classifier(k) for k in mismatched)
    if replace_head:
        state = {k: v for k, v in state.items() if not in_classifier(k)}
        missing = [k for k in missing if not in_classifier(k)]
        mismatched = []
    problems = [
        f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch in", mismatched),
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


def timm_pretrained_state(tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Download (or read from timm's cache) the pretrained weights named by a timm tag."""
    import timm

    try:
        model = timm.create_model(tag, pretrained=True)
    except RuntimeError as error:
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            raise KdError(
                f"'{tag}' is not a timm model or weights tag; see timm.list_pretrained() for valid tags"
            ) from None
        raise KdError(
            f"timm weights '{tag}' could not be downloaded ({error}); download them where a network is "
            "available and pass the local file as weights=/path/to/file.safetensors"
        ) from None
    except (OSError, ConnectionError, ValueError) as error:
        raise KdError(
            f"timm weights '{tag}' could not be downloaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}); download them where a network is available and "
            "pass the local file as weights=/path/to/file.safetensors"
        ) from None
    return model.state_dict(), model.pretrained_cfg
