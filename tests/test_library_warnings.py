"""The known third-party warning is silenced narrowly: by message, category and issuing module only."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.utilities._pytree import _tree_flatten

from kd.launch.library_warnings import silence_known_library_warnings


def test_lightning_leafspec_warning_is_silenced_but_the_same_words_from_elsewhere_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # neither pytest's filters nor earlier ones: only what kd installs
        warnings.simplefilter("always")
        _tree_flatten({"a": torch.zeros(1)})
        assert any("LeafSpec" in str(w.message) for w in caught), "the library no longer warns: drop the filter"
        caught.clear()
        silence_known_library_warnings()
        _tree_flatten({"a": torch.zeros(1)})
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)  # here
        warnings.warn("kd's own deprecation", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`isinstance(treespec, LeafSpec)` is deprecated",
        "kd's own deprecation",
    ]
