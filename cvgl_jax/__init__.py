"""cvgl_jax: cross-view geo-localization from unlabeled data, in JAX/Flax."""

__version__ = "0.1.0"
