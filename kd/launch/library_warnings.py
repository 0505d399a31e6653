"""Third-party warnings that say nothing about a kd run, silenced at startup one by one.

Each filter names the warning's message, category and the module that issues it, so the same words from
any other module (kd's own included) still show. Remove an entry once the library stops warning.
"""

from __future__ import annotations

import warnings

# (message regex, category, issuing module regex, why it is harmless)
KNOWN: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning 2.6 still builds torch's LeafSpec, deprecated in torch 2.14; nothing for the user to change",
    ),
)


def silence_known_library_warnings() -> None:
    """Install the filters of ``KNOWN``; call it once at startup (run.py, and every DDP process it starts)."""
    for message, category, module, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
