"""Datasets: the synthetic world, readers of the real layouts, pipelines."""
