"""A key the composed config does not have (``optim.learning_rate=0.1``), said in one line before Hydra runs.

Hydra refuses such a key too, but in six lines that advise ``+optim.learning_rate=0.1``: that would add a key
nothing reads, and the run would train with the default LR. kd composes the config the command line chooses
(its groups, experiment and additions) and looks each plain ``key=value`` up in it: an unknown key gets the
closest keys of its group and how to list them all. Keys added with ``+`` are left alone: some groups take
extra keys on purpose (``+teacher.arch.drop_path_rate=0.1`` goes to timm).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig

from kd.errors import KdError
from kd.io import CONF_DIR

LIST_KEYS = "python run.py --cfg job (with your other options) lists every key"


@contextmanager
def kd_hydra() -> Iterator[None]:
    """Hydra pointed at kd's ``conf/`` for one compose, leaving a caller's own Hydra (if any) as it was."""
    from kd.launch.configs import register_models

    register_models()  # run.py does this at import: every conf/model yaml as teacher=NAME and student=NAME
    global_hydra = GlobalHydra.instance()
    saved = global_hydra.hydra
    global_hydra.clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        global_hydra.clear()
        if saved is not None:
            global_hydra.initialize(saved)


def is_plain_key(override: Override, groups: set[str]) -> bool:
    """``optim.lr=0.1``: sets an existing key (not a group choice, an addition ``+``, a deletion ``~``, or Hydra's)."""
    key = override.key_or_group
    return (
        override.type == OverrideType.CHANGE
        and override.package is None
        and key not in groups
        and "/" not in key
        and key.split(".")[0] != "hydra"
    )


def first_choice(override: Override) -> str:
    """The override as one job of a sweep over it gets it first (``loss=kd,ce`` -> ``loss=kd``)."""
    if not override.is_sweep_override():
        return override.input_line
    return f"{override.get_key_element()}={next(override.sweep_string_iterator())}"


def missing_part(cfg: DictConfig, key: str) -> tuple[str, list[str], bool] | None:
    """Where ``key`` leaves the config: (the dotted path up to its first missing part, the keys beside it, whether
    that group passes extra keywords to a model builder);
    None when the key exists, or lies below a value that is not a group of keys (Hydra says what is wrong then)."""
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
            return None
        names = [str(k) for k in node]  # ``in`` says no for a key whose value is ??? (teacher.model)
        if part not in names:
            keys = [k for k in names if not k.startswith("_")]
            takes_keywords = str(node.get("_target_", "")).endswith(("TimmArch", "TorchvisionArch"))
            return ".".join(parts[: depth + 1]), keys, takes_keywords
        node = node._get_node(part)
    return None


def initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def closest_keys(name: str, keys: list[str], n: int = 3) -> list[str]:
    """The keys most like ``name`` (difflib), a key spelled by the other's initials first (lr, learning_rate)."""

    def score(key: str) -> float:
        abbreviated = len(key) > 1 and (initials(name) == key or initials(key) == name)
        return (1.0 if abbreviated else 0.0) + difflib.SequenceMatcher(None, name, key).ratio()

    return sorted(keys, key=score, reverse=True)[:n]


def unknown_key_message(key: str, value: str, missing: str, siblings: list[str], takes_keywords: bool) -> str:
    parent, _, name = missing.rpartition(".")
    prefix = f"{parent}." if parent else ""
    near = ", ".join(prefix + k for k in closest_keys(name, siblings))
    where = f"of {parent}" if parent else "at the top of the config"
    added = f" (+{key}={value} passes a new keyword to the model's builder)" if takes_keywords else ""
    return f"{key}={value} is not a key {where}; closest: {near}{added}. {LIST_KEYS}"[:300]


def unknown_key_problem(overrides: Sequence[str], groups: set[str]) -> KdError | None:
    """The first plain ``key=value`` of ``overrides`` whose key the composed config lacks, as kd's one line.
    ``groups``: the config groups (``kd.launch.preflight.config_groups``), whose ``group=option`` is a choice."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None  # a syntax error: Hydra's own message names the position
    groups = set(groups) | {"experiment"}
    keys = [o for o in parsed if is_plain_key(o, groups)]
    if not keys:
        return None
    try:
        base = [
            first_choice(o) for o in parsed if not is_plain_key(o, groups) and not o.key_or_group.startswith("hydra")
        ]
        with kd_hydra():
            cfg = compose("config", overrides=base)
    except Exception:  # noqa: BLE001 - any other problem of the command line: Hydra reports it as it runs
        return None
    swept = {o.key_or_group for o in parsed if o.is_sweep_override() and not is_plain_key(o, groups)}
    for override in keys:
        found = missing_part(cfg, override.key_or_group)
        if found is None:
            continue
        if swept & {override.key_or_group.split(".")[0], "experiment"}:
            continue  # another option of a swept group may have the key: Hydra checks each job
        value = override.input_line.partition("=")[2]
        return KdError(unknown_key_message(override.key_or_group, value, *found))
    return None
