"""poisonpool's runners: the Flower app (``flwr run sim/``) and the ``python -m sim.*`` commands."""
