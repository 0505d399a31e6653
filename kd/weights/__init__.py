"""Weights for both roles: where ``weights=`` points (``sources``), the file readers (``files``: torch,
safetensors, Lightning; ``paddle``: PaddleClas ``.pdparams``) and the ``convert`` command."""
