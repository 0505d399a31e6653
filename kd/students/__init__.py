"""The student: built from its pretrained weights (``build``: a new classifier for another class count,
zero-gamma), its card (``card``), its export (``export``), and the trained student that eval, predict
and export work on (``trained``)."""
