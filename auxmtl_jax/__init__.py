"""auxmtl_jax: multi-task dense prediction with auxiliary modules (Liu et al.) in JAX/Flax."""

__version__ = "0.1.0"
