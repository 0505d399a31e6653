"""Command-line checks of the model options, before Hydra composes anything.

``teacher=resnet50vd`` gets the closest zoo names and how to name any timm or torchvision model;
``teacher=timm teacher.model=convnxt_tiny`` gets the closest timm names; both in one short line.
"""

from __future__ import annotations

from hydra.core.override_parser.types import Override

from kd.errors import KdError
from kd.models.members import BACKENDS, zoo_names
from kd.tasks.models import member_config

BY_NAME = BACKENDS  # the entries whose model is named by ROLE.model=NAME, as members are by BACKEND:NAME
ANY = "teacher=timm teacher.model=NAME or teacher=torchvision teacher.model=NAME for any other"


def unknown_model(role: str, value: str) -> KdError:
    import difflib

    hint = ANY.replace("teacher", role)
    near = difflib.get_close_matches(value, zoo_names(), n=3, cutoff=0.5)
    guess = f"did you mean {', '.join(near)}?" if near else "python -m kd.zoo lists the zoo"
    return KdError(f"{role}={value} is unknown; {guess} ({hint})")


def check_model_overrides(parsed: list[Override]) -> None:
    """``ROLE.model`` names a real timm / torchvision model, ``teacher.members`` real members; ``teacher=timm``
    comes with a ``teacher.model``; ``student=ensemble`` is refused."""
    chosen = {o.key_or_group: o.value() for o in parsed if o.package is None and not o.is_sweep_override()}
    for role in ("teacher", "student"):
        choice = chosen.get(role)
        if role == "student" and choice == "ensemble":
            raise KdError("student=ensemble is for teachers only; give the student one model, student=NAME")
        if choice in BY_NAME and f"{role}.model" not in chosen:
            raise KdError(f"{role}={choice} needs the model's name: add {role}.model=NAME (e.g. resnet50d)")
        if choice == "custom":
            check_custom_target(role, chosen.get(f"{role}.net._target_"))
        name = chosen.get(f"{role}.model")
        if choice in BY_NAME and isinstance(name, str):
            member_arch(f"{choice}:{name}")
    members = chosen.get("teacher.members")
    if chosen.get("teacher") == "ensemble" and isinstance(members, list):
        for spec in members:
            member_arch(str(spec))


def member_arch(spec: str) -> None:
    """Builds the architecture recipe of ``zoo name``, ``timm:NAME`` or ``torchvision:NAME`` (no network)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(member_config(spec).arch)
    except InstantiationException as error:  # hydra wraps the constructor's own one-line refusal
        if isinstance(error.__cause__, KdError):
            raise error.__cause__ from None
        raise


def check_custom_target(role: str, target: object) -> None:
    """``ROLE=custom`` names an importable class: ``ROLE.net._target_=my_models.Net``."""
    if not isinstance(target, str):
        raise KdError(f"{role}=custom needs your network's class: add {role}.net._target_=my_module.MyNet")
    from hydra._internal.utils import _locate

    try:
        _locate(target)
    except (ImportError, AttributeError, ValueError) as error:
        cause = error.__cause__ or error
        raise KdError(
            f"{role}.net._target_={target} cannot be imported ({type(cause).__name__}: {str(cause)[:80]}); put its "
            "folder on the path (PYTHONPATH=DIR python run.py ...)"
        ) from None
