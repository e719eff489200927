"""Pretraining methods: each builds its model and its pure loss function from a config.

The trainer looks a method up here by `config.method`; methods differ by config and loss_fn,
never by forked trainers.
"""

from avmae.methods import cav_mae

METHODS = {"cav_mae": cav_mae.build}
