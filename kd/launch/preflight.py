"""Checks of the command line before Hydra composes it.

Hydra reports an unknown option (``teacher=nosuch``) in a dozen lines and an output folder it cannot create
with a traceback; kd says either in one line on stderr, exit code 2. ``HYDRA_FULL_ERROR=1`` skips these
checks, so Hydra's full report shows.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
from pathlib import Path

from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException

from kd.errors import KdError
from kd.io import CONF_DIR, MODEL_ROLES
from kd.launch.keys import unknown_key_problem
from kd.launch.model_names import check_model_overrides, unknown_model

OUTPUT_FOLDERS = ("hydra.run.dir", "hydra.sweep.dir")


def group_folder(group: str) -> Path:
    return CONF_DIR / ("model" if group in MODEL_ROLES else group)


def config_groups() -> list[str]:
    return sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"model"} | set(MODEL_ROLES))


def group_options(group: str) -> list[str]:
    names = {p.stem for p in group_folder(group).glob("*.yaml")}
    store = ConfigStore.instance()
    if group in store.repo:
        names |= {name.removesuffix(".yaml") for name in store.list(group)}
    return sorted(names)


MAX_MESSAGE = 200  # characters: a group whose full list is longer names the closest options and where the rest are


def unknown_option_message(group: str, value: str, options: list[str]) -> str:
    """One short line: every option of a small group, or the closest matches and where all are listed."""
    folder = group_folder(group).relative_to(CONF_DIR.parent)
    every = f"{group}={value} is unknown; choose one of {', '.join(options)} (the files in {folder}/)"
    if len(every) <= MAX_MESSAGE:
        return every
    close = difflib.get_close_matches(value, options, n=4, cutoff=0.5)
    if not close:  # nothing alike as a whole: the options that start as it does
        close = [option for option in options if option[:3] == value[:3]][:4]
    hint = f"closest: {', '.join(close)}; " if close else ""
    return f"{group}={value} is unknown; {hint}see all {len(options)} options with ls {folder}/"


def check_group_choice(group: str, values: list[str]) -> None:
    options = group_options(group)
    for value in values:
        if value in options or value == "null":
            continue
        if group in MODEL_ROLES:  # a model may be named by timm or torchvision too: kd.launch.model_names says how
            raise unknown_model(group, value)
        raise KdError(unknown_option_message(group, value, options))


def option_names(value: object) -> list[str]:
    """The options one value names: ``kd`` or, for several options of one group, ``[csv,wandb]``."""
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def check_writable_folder(key: str, folder: str) -> None:
    """Create the folder and a file in it, then remove what this check made: permission bits alone do not tell
    (root passes ``os.access`` even where the filesystem refuses, as under /proc)."""
    if "${" in folder:  # resolved by Hydra later (the default outputs/${now:...})
        return
    target = Path(folder).expanduser().absolute()
    existing, missing = target, []
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is not a folder"
        raise KdError(f"{key}={folder} cannot be written ({reason}); choose a folder you can write to")
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
        handle, probe = tempfile.mkstemp(prefix=".kd-write-test-", dir=target)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        raise KdError(f"{key}={folder} cannot be written ({reason}); choose a folder you can write to") from None
    finally:
        for path in reversed(created):  # only the folders this check made, deepest first
            path.rmdir()


def check_overrides(overrides: list[str]) -> None:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # a syntax error: Hydra's own message names the position
    groups = config_groups()
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.value() is None:
            continue
        if key in OUTPUT_FOLDERS:
            check_writable_folder(key, override.get_value_element_as_str())
        elif key in groups and override.package is None:
            if override.is_sweep_override():
                if not override.is_choice_sweep() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                    continue  # a glob picks existing options by definition
                values = [v for choice in override.value().list for v in option_names(choice)]
            else:
                values = option_names(override.value())
            check_group_choice(key, values)
    check_model_overrides(parsed)
    problem = unknown_key_problem(overrides, set(groups))  # last: it composes the config the options above chose
    if problem is not None:
        raise problem


def refuse_bad_command_line(argv: list[str] | None = None) -> None:
    """Exit with one line on stderr (code 2) if the command line names an unknown option or key, or an unwritable
    folder."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    args, _ = get_args_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        check_overrides(args.overrides or [])
    except KdError as problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
