"""Sinkhorn-Knopp projection onto doubly stochastic matrices (mHC Eq. 9), in float32."""

import jax
import jax.numpy as jnp


def sinkhorn(logits_xNxN: jax.Array, iters: int) -> jax.Array:
  """Returns M^(iters), with M^(0) = exp(logits) and M^(t) = T_r(T_c(M^(t-1))), exactly.

  T_c divides every column by its sum, T_r every row by its sum; the last step normalises rows, so
  rows sum to 1 and columns approach 1 as iters grows. Like Eq. 9, the result does not change when
  a constant is added to any column of the logits (the first T_c removes it), however spread the
  logits are.

  The first (T_c, T_r) pair runs in the log domain (subtract a max-shifted log-sum-exp over the row
  index, then take a max-shifted softmax over the column index): exp(logits) itself is never
  formed, so no entry underflows against another row's or column's scale. After that pair every
  column and row sum lies in [1/N, N] and stays there (each step divides by sums of a matrix whose
  rows or columns sum to 1), so the remaining steps divide in the linear domain: as exact in
  float32, and far cheaper than a log-sum-exp per step (an all-log-domain loop measured about 13x
  slower forward, 1.2x to 1.5x forward + backward, on CPU). Only entries below float32's range
  (1e-38) are lost there; each step scales an entry by at most N, so they stay below
  1e-38 * N^(2 iters) (1e-15 at N = 4, iters = 20).

  Args:
    logits_xNxN: [..., N, N] logits, any float dtype.
    iters: number of (column, row) normalisation pairs, >= 1.
  Returns:
    [..., N, N] float32, non-negative, rows summing to 1.
  """
  # The 2 * iters normalisations are many tiny ops. They run in a loop (one compiled body, not
  # 2 * iters unrolled copies: much less compile time, and the loop-carried buffers are reused),
  # on [N, N, ...] (the batch axes minor, so every op is a long contiguous vector loop), and reduce
  # over the short axes by explicit elementwise ops on slices (fused with their consumers; a
  # reduction would be a kernel of its own). About 6x faster forward + backward on CPU than an
  # unrolled loop of reductions over the trailing [.., N, N] axes, with the same arithmetic.
  nd = logits_xNxN.ndim
  logits_NxNx = jnp.moveaxis(logits_xNxN.astype(jnp.float32), (nd - 2, nd - 1), (0, 1))
  log_m = logits_NxNx - _logsumexp_keepdims(logits_NxNx, axis=0)  # Columns: over the row index.
  m = _softmax_keepdims(log_m, axis=1)  # Rows: exp(log_m) / its row sums.

  def step(_, m):
    m = m / _fold(jnp.add, _slices(m, axis=0))
    return m / _fold(jnp.add, _slices(m, axis=1))

  m = jax.lax.fori_loop(1, iters, step, m)
  return jnp.moveaxis(m, (0, 1), (nd - 2, nd - 1))


def _logsumexp_keepdims(a: jax.Array, axis: int) -> jax.Array:
  """log(sum(exp(a))) over a short axis (keepdims)."""
  top, e = _shifted_exp(a, axis)
  return top + jnp.log(_fold(jnp.add, _slices(e, axis)))


def _softmax_keepdims(a: jax.Array, axis: int) -> jax.Array:
  """exp(a) / sum(exp(a)) over a short axis."""
  _, e = _shifted_exp(a, axis)
  return e / _fold(jnp.add, _slices(e, axis))


def _shifted_exp(a: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(max of a over the axis (keepdims), exp(a - that max)): exp stays in range."""
  # The shift cancels in the value and gradient of both callers; stopping it spares its backward.
  top = jax.lax.stop_gradient(_fold(jnp.maximum, _slices(a, axis)))
  return top, jnp.exp(a - top)


def _slices(a: jax.Array, axis: int) -> list[jax.Array]:
  return [jax.lax.slice_in_dim(a, i, i + 1, axis=axis) for i in range(a.shape[axis])]


def _fold(op, xs: list[jax.Array]) -> jax.Array:
  total = xs[0]
  for x in xs[1:]:
    total = op(total, x)
  return total
