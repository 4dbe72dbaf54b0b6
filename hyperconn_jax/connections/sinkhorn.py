"""Sinkhorn-Knopp projection onto doubly stochastic matrices (mHC Eq. 9), in float32."""

import jax
import jax.numpy as jnp


def sinkhorn(logits_xNxN: jax.Array, iters: int, eps: float) -> jax.Array:
  """Returns M^(iters), with M^(0) = exp(logits) + eps and M^(t) = T_r(T_c(M^(t-1))).

  T_c divides every column by its sum, T_r every row by its sum; the last step normalises rows, so
  rows sum to exactly 1 and columns approach 1 as iters grows. Each matrix's max logit is subtracted
  before exp (normalisation removes any common factor, and exp stays finite). Adding eps to every
  entry, as DeepSeek's TileKernels does after its first step, keeps each row and column sum > 0 even
  where exp underflows for very spread logits: no NaN, and no row of the result is ever all zero.

  Args:
    logits_xNxN: [..., N, N] logits, any float dtype.
    iters: number of (column, row) normalisation pairs, >= 1.
    eps: added to every entry of exp(logits - max), > 0.
  Returns:
    [..., N, N] float32, positive, rows summing to 1.
  """
  logits = logits_xNxN.astype(jnp.float32)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1), keepdims=True))
  m = jnp.exp(logits - shift) + eps
  for _ in range(iters):
    m = m / _sum_keepdims(m, axis=-2)
    m = m / _sum_keepdims(m, axis=-1)
  return m


def _sum_keepdims(m: jax.Array, axis: int) -> jax.Array:
  """Sum over a short axis as explicit adds of its slices: elementwise ops, which XLA fuses with
  the division, where a reduction would be a kernel of its own for each of the 2 * iters steps
  (about half the time of mHC's many tiny [B, L, n, n] ops on CPU)."""
  total = jax.lax.slice_in_dim(m, 0, 1, axis=axis)
  for i in range(1, m.shape[axis]):
    total = total + jax.lax.slice_in_dim(m, i, i + 1, axis=axis)
  return total
