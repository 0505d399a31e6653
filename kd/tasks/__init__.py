"""Tasks, chosen by ``task=``: distill (default), train, eval, predict, export. Each takes the composed config."""
