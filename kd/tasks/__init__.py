"""Tasks, chosen by ``task=``: distill (default), train, eval. Each takes the composed config."""
