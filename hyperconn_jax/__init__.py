"""hyperconn_jax: hyper-connections (HC, mHC, Frac-Connections) in JAX / Flax NNX."""

__version__ = '0.1.0'
