"""The Optuna backend: its storage, samplers and pruners by name, the ask/tell trial loop,
worker processes and the recovery of lost trials. A new sampler is one entry in samplers.py, a
new pruner one in pruners.py."""
