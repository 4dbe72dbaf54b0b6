"""Sinkhorn-Knopp projection onto doubly stochastic matrices (mHC Eq. 9), in float32."""

import jax
import jax.numpy as jnp


def sinkhorn(logits_xNxN: jax.Array, iters: int, eps: float) -> jax.Array:
  """Returns M^(iters), with M^(0) = exp(logits) and M^(t) = T_r(T_c(M^(t-1))).

  T_c divides every column by its sum, T_r every row by its sum; the last step normalises rows, so
  rows sum to 1 and columns approach 1 as iters grows. Subtracting each matrix's max before exp
  changes nothing (normalisation removes any common factor) but keeps exp finite. A sum below eps is
  replaced by eps, so a column or row that underflowed to 0 stays 0 instead of giving NaN; above eps
  the normalisations are exact.

  Args:
    logits_xNxN: [..., N, N] logits, any float dtype.
    iters: number of (column, row) normalisation pairs, >= 1.
    eps: floor of the sums, > 0.
  Returns:
    [..., N, N] float32, non-negative.
  """
  logits = logits_xNxN.astype(jnp.float32)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1), keepdims=True))
  m = jnp.exp(logits - shift)
  for _ in range(iters):
    m = m / jnp.maximum(jnp.sum(m, axis=-2, keepdims=True), eps)
    m = m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), eps)
  return m
