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
  # The 2 * iters normalisations are many tiny ops. They run in a loop (one compiled body, not
  # 2 * iters unrolled copies: much less compile time, and the loop-carried buffers are reused),
  # on [N, N, ...] (the batch axes minor, so every op is a long contiguous vector loop), and sum
  # over the short axes by explicit adds of slices (elementwise, fused with the division; a
  # reduction would be a kernel of its own). About 6x faster forward + backward on CPU than an
  # unrolled loop of reductions over the trailing [.., N, N] axes, with the same arithmetic.
  nd = logits_xNxN.ndim
  logits_NxNx = jnp.moveaxis(logits_xNxN.astype(jnp.float32), (nd - 2, nd - 1), (0, 1))
  shift = jax.lax.stop_gradient(jnp.max(logits_NxNx, axis=(0, 1), keepdims=True))

  def step(_, m):
    m = m / _sum_keepdims(m, axis=0)  # Columns: sum over the row index.
    return m / _sum_keepdims(m, axis=1)  # Rows.

  m = jax.lax.fori_loop(0, iters, step, jnp.exp(logits_NxNx - shift) + eps)
  return jnp.moveaxis(m, (0, 1), (nd - 2, nd - 1))


def _sum_keepdims(m: jax.Array, axis: int) -> jax.Array:
  """Sum over a short axis (keepdims) as explicit adds of its slices."""
  total = jax.lax.slice_in_dim(m, 0, 1, axis=axis)
  for i in range(1, m.shape[axis]):
    total = total + jax.lax.slice_in_dim(m, i, i + 1, axis=axis)
  return total
