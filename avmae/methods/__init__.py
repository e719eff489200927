"""Pretraining methods: each builds its model and its pure loss function from a config.

The trainer looks a method up here by `config.method`; methods differ by config and loss_fn,
never by forked trainers.
"""

from avmae.methods import audio_mae, av_mae, cav_mae

METHODS = {"audio_mae": audio_mae.build, "av_mae": av_mae.build, "cav_mae": cav_mae.build}
