"""Architectures: a recipe that builds a network for a class count, and knows its preprocessing.

Each backend (timm, torchvision, our own small networks) also knows which published weights it can
fetch by name and fetches them with its own library, so ``weights=<name>`` needs no if/else on the
backend anywhere else (``kd.weights.sources`` decides that a name is a published source at all).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

import timm
import torch
from torch import nn

from kd.errors import KdError
from kd.models.classifier import Preprocessing

PRETRAINED = "pretrained"  # weights=pretrained: the backend's default weights for the architecture

#: Builder keywords kd sets itself, and why a model's arch keywords cannot set them.
SET_BY_KD = {
    "num_classes": "kd builds the classifier for the dataset's classes",
    "pretrained": "kd loads the weights itself: set ROLE.weights=pretrained, a tag, a file or none",
    "weights": "kd loads the weights itself: set ROLE.weights=pretrained, a tag, a file or none",
    "in_chans": "torchvision's models read 3-channel images; name the model with ROLE=timm to set in_chans",
}


def reserved_keyword(backend: str, kwargs: dict) -> str | None:
    """The first keyword in ``kwargs`` that kd passes to ``backend``'s builder itself (timm takes in_chans)."""
    own = ("num_classes", "pretrained") if backend == "timm" else ("num_classes", "pretrained", "weights", "in_chans")
    return next((key for key in own if key in kwargs), None)


def refuse_reserved_keyword(backend: str, kwargs: dict) -> None:
    key = reserved_keyword(backend, kwargs)
    if key is not None:
        reason = SET_BY_KD[key].replace("ROLE.", "").replace("ROLE=", "")
        raise KdError(f"{key}={kwargs[key]} cannot be given to a {backend} model ({reason}); remove it")


class Arch(Protocol):
    backend: str  # "timm", "torchvision" or "kd"

    @property
    def id(self) -> str:
        """The backend's name for the architecture (with any argument that changes it)."""
        ...

    @property
    def num_classes(self) -> int:
        """The class count its published weights (or recipe) have."""
        ...

    def build(self, num_classes: int) -> nn.Module: ...

    def preprocessing(self) -> Preprocessing: ...

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        """State-dict key prefixes of the final classifier (replaced when the class count differs)."""
        ...

    def weight_names(self) -> list[str]:
        """Published weights ``weights=`` accepts by name, default first."""
        ...

    def pretrained_state(self, name: str) -> tuple[dict[str, torch.Tensor], Preprocessing]:
        """Published weights by name (``pretrained`` = the default) and the preprocessing they were trained with."""
        ...


def last_linear_prefix(net: nn.Module) -> tuple[str, ...]:
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    return (names[-1] + ".",) if names else ()


class TimmArch:
    """Any timm model, by its timm name (``resnet50d`` is PaddleClas's ResNet50_vd).

    Extra keyword arguments go to the timm builder and may change the architecture
    (``layers=[3, 12, 48, 3]``); timm's published weights then no longer apply. ``data_config``
    overrides entries of timm's ``pretrained_cfg`` (``input_size``, ``interpolation``, ``crop_pct``,
    ``mean``, ``std``) for a model whose weights come from elsewhere.
    """

    backend = "timm"

    def __init__(
        self,
        model_name: str,
        in_chans: int = 3,
        data_config: dict | None = None,
        num_classes: int | None = None,
        **kwargs,
    ) -> None:
        self.model_name = str(model_name)  # a timm name, with a tag (``convnext_tiny.fb_in1k``), or a hub name
        self.in_chans = in_chans
        # 0: no classifier, the pooled features are the output (an embedding teacher); None: the dataset's classes.
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 0):  # fmt: skip
            raise KdError(f"arch.num_classes={num_classes!r} must be 0 (features only) or a class count")
        self.fixed_classes = num_classes
        self.data_config = dict(data_config or {})
        self.kwargs = kwargs
        refuse_reserved_keyword(self.backend, kwargs)
        if not self.is_hub:
            check_timm_name(self.model_name)

    @property
    def is_hub(self) -> bool:
        """``hf-hub:timm/NAME`` or ``local-dir:/folder``: architecture and weights come from that source."""
        return self.model_name.startswith(HUB_PREFIXES)

    @property
    def base_name(self) -> str:
        """The timm architecture: the name without its weights tag (``convnext_tiny``)."""
        return hub_config(self.model_name)[1] if self.is_hub else self.model_name.split(".")[0]

    @property
    def id(self) -> str:
        arguments = ", ".join(f"{k}={list(v) if isinstance(v, tuple | list) else v}" for k, v in self.kwargs.items())
        return f"{self.base_name}({arguments})" if arguments else self.base_name

    def _pretrained_cfg(self) -> dict:
        if self.is_hub:
            return dict(hub_config(self.model_name)[0])
        return timm.models.get_pretrained_cfg(self.model_name).to_dict()

    @property
    def num_classes(self) -> int:
        return self._pretrained_cfg().get("num_classes") or 1000

    def build(self, num_classes: int) -> nn.Module:
        name = self.base_name if self.is_hub else self.model_name
        classes = num_classes if self.fixed_classes is None else self.fixed_classes
        return timm.create_model(name, pretrained=False, num_classes=classes, in_chans=self.in_chans, **self.kwargs)

    def preprocessing(self, pretrained_cfg: dict | None = None) -> Preprocessing:
        cfg = pretrained_cfg or {**self._pretrained_cfg(), **self.data_config}
        _, height, width = cfg["input_size"]
        return Preprocessing(
            mean=tuple(cfg["mean"])[: self.in_chans] if self.in_chans != 3 else tuple(cfg["mean"]),
            std=tuple(cfg["std"])[: self.in_chans] if self.in_chans != 3 else tuple(cfg["std"]),
            input_size=(self.in_chans, height, width),
            interpolation=cfg.get("interpolation", "bilinear"),
            crop_pct=cfg.get("crop_pct", 0.875),
        )

    def default_weights(self) -> str:
        """The weights ``weights=pretrained`` names: the tag given with the name, else timm's default tag."""
        if self.is_hub or "." in self.model_name:
            return self.model_name
        return f"{self.model_name}.{timm.models.get_pretrained_cfg(self.model_name).tag}"

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        name = net.pretrained_cfg.get("classifier") if hasattr(net, "pretrained_cfg") else None
        names = name if isinstance(name, list | tuple) else [name] if name else []
        return tuple(n + "." for n in names) or last_linear_prefix(net)

    def weight_names(self) -> list[str]:
        if self.kwargs:
            return []
        if self.is_hub:
            return [self.model_name]
        tags = timm.list_pretrained(f"{self.base_name}.*")
        default = self.default_weights()
        return sorted(tags, key=lambda tag: tag != default)

    def pretrained_state(self, name: str) -> tuple[dict[str, torch.Tensor], Preprocessing]:
        if self.kwargs:
            raise KdError(
                f"timm has no published weights for {self.id} (its arguments change the architecture); "
                "pass a local weights file"
            )
        tag = self.default_weights() if name == PRETRAINED else name
        if not tag.startswith(HUB_PREFIXES) and tag.split(".")[0] != self.base_name:
            raise KdError(
                f"weights '{name}' are for timm architecture '{tag.split('.')[0]}', not {self.base_name}; "
                f"pick one of timm.list_pretrained('{self.base_name}.*')"
            )
        state, pretrained_cfg = timm_pretrained_state(tag, self.in_chans)
        return state, self.preprocessing(pretrained_cfg)


HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm's own model sources besides its registry


def closest(name: str, names: list[str], count: int = 3) -> str:
    """``'a', 'b'`` for the error line: the names most like ``name`` (difflib), or the first few."""
    import difflib

    return ", ".join(difflib.get_close_matches(name, names, n=count, cutoff=0.5) or names[:count])


def check_timm_name(model_name: str) -> None:
    """A timm registry name (with an optional weights tag), refused in one line with the closest names."""
    base, _, tag = model_name.partition(".")
    if base not in timm.list_models():
        raise KdError(
            f"'{base}' is not a timm model; did you mean {closest(base, timm.list_models())}? "
            "(timm.list_models() lists them)"
        )
    if tag and model_name not in timm.list_pretrained(f"{base}.*"):
        raise KdError(
            f"'{model_name}' is not a timm weights tag of {base}; did you mean "
            f"{closest(model_name, timm.list_pretrained(f'{base}.*'))}?"
        )


@lru_cache(maxsize=16)
def hub_config(model_name: str) -> tuple[dict, str]:
    """(pretrained_cfg, timm architecture) of an ``hf-hub:`` or ``local-dir:`` model, read by timm."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    source, _, model_id = model_name.partition(":")
    try:
        if source == "local-dir":
            pretrained_cfg, architecture, _ = load_model_config_from_path(model_id)
        else:
            pretrained_cfg, architecture, _ = load_model_config_from_hf(model_id)
    except (OSError, ValueError, RuntimeError) as error:  # no network, no such repo or folder
        raise download_failed(f"the timm config of {model_name}", error) from None
    return dict(pretrained_cfg), architecture


class TorchvisionArch:
    """A torchvision classification model (for what timm lacks: alexnet, googlenet, shufflenet_v2_x1_0)."""

    backend = "torchvision"

    def __init__(self, model_name: str, **kwargs) -> None:
        import torchvision

        # ``regnet_y_400mf.IMAGENET1K_V2``: a weights name after the dot is what weights=pretrained means.
        self.model_name, _, self.tag = str(model_name).partition(".")
        names = torchvision.models.list_models(module=torchvision.models)
        if self.model_name not in names:
            raise KdError(
                f"'{self.model_name}' is not a torchvision classification model; did you mean "
                f"{closest(self.model_name, names)}? (torchvision.models.list_models() lists them)"
            )
        if self.tag and self.tag not in self._weights_enum().__members__:
            raise KdError(
                f"'{self.tag}' is not a torchvision weights name of {self.model_name}; use one of "
                f"{', '.join(self.weight_names())}"
            )
        refuse_reserved_keyword(self.backend, kwargs)
        self.kwargs = kwargs

    @property
    def id(self) -> str:
        return self.model_name

    def default_weights(self) -> str:
        """The weights ``weights=pretrained`` names: the one given after the dot, else torchvision's default."""
        return self.tag or self._weights_enum().DEFAULT.name

    def _weights_enum(self):
        import torchvision

        return torchvision.models.get_model_weights(self.model_name)

    @property
    def num_classes(self) -> int:
        return len(self._weights_enum().DEFAULT.meta["categories"])

    def build(self, num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(self.model_name, weights=None, num_classes=num_classes, **self.kwargs)

    def preprocessing(self, weights=None) -> Preprocessing:
        transform = (weights or self._weights_enum()[self.default_weights()]).transforms()
        return Preprocessing(
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            input_size=(3, transform.crop_size[0], transform.crop_size[0]),
            interpolation=transform.interpolation.value,
            crop_pct=transform.crop_size[0] / transform.resize_size[0],
        )

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        return last_linear_prefix(net)

    def weight_names(self) -> list[str]:
        default = self.default_weights()
        return sorted((w.name for w in self._weights_enum()), key=lambda name: name != default)

    def pretrained_state(self, name: str) -> tuple[dict[str, torch.Tensor], Preprocessing]:
        enum = self._weights_enum()
        short = name.split(".")[-1]  # AlexNet_Weights.IMAGENET1K_V1 or IMAGENET1K_V1
        if name != PRETRAINED and short not in enum.__members__:
            raise KdError(
                f"'{name}' is not a torchvision weights name of {self.model_name}; "
                f"use one of {', '.join(self.weight_names())}"
            )
        weights = enum[self.default_weights()] if name == PRETRAINED else enum[short]
        # Built by torchvision's own builder, which sets what the weights need (googlenet: transform_input)
        # and drops what they lack; a yaml's kwargs must build the same network.
        return torchvision_pretrained_state(self.model_name, weights), self.preprocessing(weights)


class ModuleArch:
    """A network class of our own (the digits and CIFAR networks), with its preprocessing stated in config."""

    backend = "kd"

    def __init__(
        self,
        net: Callable[..., nn.Module],
        mean: list[float],
        std: list[float],
        input_size: list[int],
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
        num_classes: int = 10,
        no_weights: str | None = None,
    ) -> None:
        self.net = net
        self._num_classes = num_classes
        self.no_weights = no_weights  # why ``weights=pretrained`` cannot be had (said when it is asked for)
        self._preprocessing = Preprocessing(
            mean=tuple(mean),
            std=tuple(std),
            input_size=tuple(input_size),
            interpolation=interpolation,
            crop_pct=crop_pct,
        )

    @property
    def id(self) -> str:
        func = getattr(self.net, "func", self.net)
        arguments = ", ".join(f"{k}={v}" for k, v in getattr(self.net, "keywords", {}).items())
        return f"{func.__module__.removeprefix('kd.models.')}.{func.__qualname__}({arguments})"

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def build(self, num_classes: int) -> nn.Module:
        """``net(num_classes=...)``, with ``in_chans=`` too where the constructor takes it (a user's own class
        need not)."""
        import inspect

        func = getattr(self.net, "func", self.net)
        try:
            parameters = inspect.signature(func).parameters
        except (TypeError, ValueError):
            parameters = {}
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if parameters and not takes_any and "num_classes" not in parameters:
            raise KdError(
                f"{self.id} takes no num_classes argument, so kd cannot build it for the dataset's classes; "
                "add num_classes to its constructor"
            )
        extra = {"in_chans": self._preprocessing.in_chans} if takes_any or "in_chans" in parameters else {}
        return self.net(num_classes=num_classes, **extra)

    def preprocessing(self, pretrained_cfg: dict | None = None) -> Preprocessing:
        return self._preprocessing

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        return last_linear_prefix(net)

    def weight_names(self) -> list[str]:
        return []

    def pretrained_state(self, name: str) -> tuple[dict[str, torch.Tensor], Preprocessing]:
        if self.no_weights:
            raise KdError(
                f"{self.id} has no published PyTorch weights ({self.no_weights}); pass a local weights file "
                "(weights=/path/to/file.safetensors) or weights=none"
            )
        raise KdError(
            f"{self.id} has no published weights named '{name}'; pass weights=auto (train once and cache), "
            "a local weights file, or none"
        )


# --- published weights, fetched by each backend's own library ----------------------------------------


def download_failed(what: str, error: BaseException) -> KdError:
    first_line = (str(error).splitlines() or [""])[0].strip()
    if len(first_line) > 60:  # the library's own explanation can be long; the message stays one short line
        first_line = first_line[:57].rstrip() + "..."
    return KdError(
        f"{what} could not be downloaded ({type(error).__name__}: {first_line}); download them where a network "
        "is available and pass the local file as weights=/path/to/file.safetensors"
    )


def timm_pretrained_state(tag: str, in_chans: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """Download (or read from timm's cache) the pretrained weights named by a timm tag."""
    import timm

    try:
        model = timm.create_model(tag, pretrained=True, in_chans=in_chans)
    except RuntimeError as error:
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            raise KdError(
                f"'{tag}' is not a timm model or weights tag; see timm.list_pretrained() for valid tags"
            ) from None
        raise download_failed(f"timm weights '{tag}'", error) from None
    except (OSError, ConnectionError, ValueError) as error:
        raise download_failed(f"timm weights '{tag}'", error) from None
    return model.state_dict(), model.pretrained_cfg


def torchvision_pretrained_state(model_name: str, weights) -> dict[str, torch.Tensor]:
    """Download (or read from torch hub's cache) torchvision weights; the builder sets what they need."""
    import torchvision

    try:
        model = torchvision.models.get_model(model_name, weights=weights)
    except (OSError, RuntimeError, ValueError) as error:  # urllib's URLError is an OSError
        raise download_failed(f"torchvision weights {model_name} {weights.name}", error) from None
    return model.state_dict()
