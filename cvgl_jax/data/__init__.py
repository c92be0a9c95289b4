"""Datasets: the synthetic world, readers of the real layouts, pipelines.

This file imports nothing, so that config validation (`config_lib`) can
name the choices of `config.data` without loading the pipeline.
"""

# `config.data.on_bad_image` and `.odd_image_size` (`image_check`).
ON_BAD_IMAGE = ("error", "skip")
ODD_IMAGE_SIZE = ("error", "resize")
