"""The large contractions of the hyper-connections: the dynamic projection of the normalised
streams (float32), and the width and depth connections (in the streams' dtype).

For the width and depth connections, coefficients arrive in float32; products and sums are float32,
results are cast to the streams' dtype. A coefficient tensor without leading batch axes is shared
by every token (static HC). The sums over the few streams are unrolled element-wise multiply-adds
and the per-token inner products matrix-vector products: XLA fuses the former into one pass over
the streams, where per-token matrix-matrix dot_generals with N x M matrices cost XLA:CPU 2-3x
as much (one small matmul call per token).

The width and depth connections have hand-written gradients that keep D the minor axis of every
big operand and never broadcast the branch output or the coefficients to the [B, L, N, D] shape of
the streams; JAX's generic rules for dot_general and broadcasting multiplies make XLA materialise
transposed or broadcast copies of stream-sized tensors there (checked in the compiled HLO on CPU,
where reductions also need their broadcast operands materialised). No function here saves a
stream-sized tensor for the backward pass other than its input x. See docs/performance.md.
"""

import jax
import jax.numpy as jnp

from hyperconn_jax import norms


def normed_projection(x_BxLxNxW: jax.Array, w_WxK: jax.Array, kind: str,
                      eps: float) -> jax.Array:
  """Returns normalize(x, kind, eps) @ w in float32, [B, L, N, K], without forming normalize(x).

  The norm is folded into the projection (as mHC's Eqs. 14-16 do for RMSNorm): with per-stream
  mean mu and inverse std r, ((x - mu) r) @ w = r (x @ w - mu sum_w(w)). The big tensor is read
  twice, by one matmul (whose extra column gives mu) and by the sum of squares; no normalised copy
  of the streams is written in the forward pass nor read back in the backward pass. The variance
  is E[x^2] - mu^2 (clamped at 0), which differs from norms.normalize's two-pass variance by
  float32 rounding of relative size ~1e-7 (1 + mu^2 / var): negligible unless a stream's mean is
  thousands of times its standard deviation.

  Args:
    x_BxLxNxW: [..., W] streams or fractions, any float dtype.
    w_WxK: [W, K] projection (float32).
    kind: 'layernorm' | 'rmsnorm' | 'none' (see norms.normalize).
    eps: added to the variance.
  """
  x = x_BxLxNxW.astype(jnp.float32)
  w_WxK = w_WxK.astype(jnp.float32)
  width = x.shape[-1]
  if kind == 'layernorm':
    w_WxK = jnp.concatenate([w_WxK, jnp.full((width, 1), 1.0 / width, jnp.float32)], axis=1)
  # A 2-D matmul of the flattened rows: XLA:CPU turns the weight gradient of the batched einsum
  # '...w,wk->...k' into a transposing copy of the cotangent (as for the dense layers).
  proj_BxLxNxK = project_rows(x.reshape(-1, width), w_WxK).reshape(*x.shape[:-1],
                                                                  w_WxK.shape[-1])
  if kind == 'none':
    return proj_BxLxNxK
  mean_square_BxLxNx1 = mean_square(x)
  if kind == 'layernorm':
    proj_BxLxNxK, mean_BxLxNx1 = proj_BxLxNxK[..., :-1], proj_BxLxNxK[..., -1:]
    var_BxLxNx1 = jnp.maximum(mean_square_BxLxNx1 - jnp.square(mean_BxLxNx1), 0.0)
    proj_BxLxNxK = proj_BxLxNxK - mean_BxLxNx1 * jnp.sum(w_WxK[:, :-1], axis=0)
  elif kind == 'rmsnorm':
    var_BxLxNx1 = mean_square_BxLxNx1
  else:
    raise ValueError(f'norm kind must be one of {norms.NORM_KINDS}, got {kind!r}')
  return proj_BxLxNxK * jax.lax.rsqrt(var_BxLxNx1 + eps)


# Widest projection whose weight gradient is a multiply-reduce over the rows rather than a matmul.
NARROW_K = 32


def project_rows(x_RxW: jax.Array, w_WxK: jax.Array) -> jax.Array:
  """x @ w in float32 (HIGHEST precision) for the rows [R, W] of the flattened streams and a
  dynamic projection w [W, K]; a narrow w (K <= NARROW_K) gets _narrow_project's gradient."""
  return (_narrow_project if w_WxK.shape[-1] <= NARROW_K else _dot)(x_RxW, w_WxK)


def _dot(x_RxW: jax.Array, w_WxK: jax.Array) -> jax.Array:
  return jnp.dot(x_RxW, w_WxK, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _narrow_project(x_RxW: jax.Array, w_WxK: jax.Array) -> jax.Array:
  """x @ w (float32) for a narrow w (K <= NARROW_K columns).

  Its weight gradient x^T g, [W, K] from R rows, is one pass over x; XLA:CPU runs it as a matmul
  with a transposed operand at a tenth of the memory speed (~2.5 ms for 8192 rows x 256 x 7),
  and as a broadcast multiply-reduce over the rows in a third of that (1.5-4x up to K = 24,
  measured; slower from K ~ 80 at W = 1024). On accelerators this product is memory-bound as well
  (K is far below a matmul unit's width), so the reduction form costs them one pass too (not
  measured there: no accelerator was available).
  """
  return _dot(x_RxW, w_WxK)


def _narrow_project_fwd(x_RxW, w_WxK):
  return _narrow_project(x_RxW, w_WxK), (x_RxW, w_WxK)


def _narrow_project_bwd(residuals, g_RxK):
  x_RxW, w_WxK = residuals
  dw_KxW = jnp.sum(x_RxW[:, None, :] * g_RxK[:, :, None], axis=0)
  return _dot(g_RxK, w_WxK.T), dw_KxW.T


_narrow_project.defvjp(_narrow_project_fwd, _narrow_project_bwd)


@jax.custom_vjp
def mean_square(x_BxLxNxW):
  """mean(x^2) over the last axis, keepdims; its gradient keeps x (which the stream mixing
  keeps anyway) rather than a stream-sized 2 x as jnp.square's would."""
  return jnp.mean(jnp.square(x_BxLxNxW), axis=-1, keepdims=True)


def _mean_square_fwd(x_BxLxNxW):
  return mean_square(x_BxLxNxW), x_BxLxNxW


def _mean_square_bwd(x_BxLxNxW, g_BxLxNx1):
  return ((2.0 / x_BxLxNxW.shape[-1]) * g_BxLxNx1 * x_BxLxNxW,)


mean_square.defvjp(_mean_square_fwd, _mean_square_bwd)


def _weighted_sum(w_BxLxJxK: jax.Array, v_BxLxJxD: jax.Array, dtype) -> jax.Array:
  """out[..., k, :] = sum_j w[..., j, k] v[..., j, :], [B, L, K, D] in `dtype`, as J x K
  element-wise multiply-adds (float32) that XLA fuses into one pass over v.

  J and K are the (small) stream counts. Per-token dot_generals with these tiny matrices cost
  XLA:CPU 2-3x the time of the fused element-wise form (one small matmul call per token).
  """
  v = v_BxLxJxD.astype(jnp.float32)
  w = w_BxLxJxK.astype(jnp.float32)
  outs = [sum(w[..., j, k, None] * v[..., j, :] for j in range(v.shape[-2]))
          for k in range(w.shape[-1])]
  return jnp.stack(outs, axis=-2).astype(dtype)


def _inner(a_BxLxJxD: jax.Array, b_BxLxKxD: jax.Array) -> jax.Array:
  """out[..., j, k] = <a[..., j, :], b[..., k, :]> in float32, [B, L, J, K]: K per-token
  matrix-vector products (faster on XLA:CPU than one per-token matrix-matrix dot_general)."""
  outs = [jnp.einsum('...jd,...d->...j', a_BxLxJxD, b_BxLxKxD[..., k, :],
                     preferred_element_type=jnp.float32) for k in range(b_BxLxKxD.shape[-2])]
  return jnp.stack(outs, axis=-1)


def mix_streams(coef_NxM: jax.Array, x_BxLxNxD: jax.Array) -> jax.Array:
  """Width connection: returns y[..., m, :] = sum_n coef[..., n, m] x[..., n, :] in x's dtype.

  Args:
    coef_NxM: [N, M] (shared by all tokens) or [B, L, N, M] (per token), any float dtype.
    x_BxLxNxD: the streams [B, L, N, D].
  """
  # A shared coefficient is broadcast to every token (N x M floats each; fused, not written).
  coef_BxLxNxM = jnp.broadcast_to(coef_NxM, (*x_BxLxNxD.shape[:-2], *coef_NxM.shape[-2:]))
  return _mix(coef_BxLxNxM, x_BxLxNxD)


@jax.custom_vjp
def _mix(coef_BxLxNxM, x_BxLxNxD):
  return _weighted_sum(coef_BxLxNxM, x_BxLxNxD, x_BxLxNxD.dtype)


def _mix_fwd(coef_BxLxNxM, x_BxLxNxD):
  return _mix(coef_BxLxNxM, x_BxLxNxD), (coef_BxLxNxM, x_BxLxNxD)


def _mix_bwd(residuals, dy_BxLxMxD):
  coef_BxLxNxM, x_BxLxNxD = residuals
  # dx[n, :] = sum_m coef[n, m] dy[m, :]  and  dcoef[n, m] = <x[n, :], dy[m, :]>, per token.
  dx = _weighted_sum(jnp.swapaxes(coef_BxLxNxM, -1, -2), dy_BxLxMxD, x_BxLxNxD.dtype)
  dcoef = _inner(x_BxLxNxD, dy_BxLxMxD.astype(x_BxLxNxD.dtype))
  return dcoef.astype(coef_BxLxNxM.dtype), dx


_mix.defvjp(_mix_fwd, _mix_bwd)


def add_branch(beta_N: jax.Array, y_BxLxNxD: jax.Array, res_BxLxNxD: jax.Array) -> jax.Array:
  """Depth connection: returns beta[..., n] * y[..., n, :] + res[..., n, :] in res's dtype.

  Args:
    beta_N: [N] or [B, L, N] float32 weights of the branch output per stream.
    y_BxLxNxD: the branch output, broadcastable to res (HC passes [B, L, 1, D]).
    res_BxLxNxD: the mixed residual streams [B, L, N, D].
  """
  beta_BxLxN = jnp.broadcast_to(beta_N, res_BxLxNxD.shape[:-1])
  y_BxLxNxD = jnp.broadcast_to(y_BxLxNxD, (*res_BxLxNxD.shape[:-2], y_BxLxNxD.shape[-2],
                                           res_BxLxNxD.shape[-1]))
  return _add_branch(beta_BxLxN, y_BxLxNxD, res_BxLxNxD)


@jax.custom_vjp
def _add_branch(beta_BxLxN, y_BxLxKxD, res_BxLxNxD):
  out = (beta_BxLxN[..., None] * y_BxLxKxD.astype(jnp.float32)
         + res_BxLxNxD.astype(jnp.float32))
  return out.astype(res_BxLxNxD.dtype)


def _add_branch_fwd(beta_BxLxN, y_BxLxKxD, res_BxLxNxD):
  # res is not needed by the backward pass: only its dtype is kept (no stream-sized residual).
  res_dtype = jnp.zeros((), res_BxLxNxD.dtype)
  return _add_branch(beta_BxLxN, y_BxLxKxD, res_BxLxNxD), (beta_BxLxN, y_BxLxKxD, res_dtype)


def _add_branch_bwd(residuals, dout_BxLxNxD):
  beta_BxLxN, y_BxLxKxD, res_dtype = residuals
  # Neither gradient broadcasts beta or y to the [B, L, N, D] shape of the cotangent (XLA's CPU
  # reductions would need such broadcast operands materialised).
  if y_BxLxKxD.shape[-2] == 1:  # One branch output for every stream.
    # dbeta[n] = <dout[n, :], y>,  dy = sum_n beta[n] dout[n, :].
    dbeta = _inner(dout_BxLxNxD, y_BxLxKxD.astype(dout_BxLxNxD.dtype))[..., 0]
    dy = _weighted_sum(beta_BxLxN[..., None], dout_BxLxNxD, jnp.float32)
  else:  # One branch output per stream (Frac-Connections' fractions).
    dout = dout_BxLxNxD.astype(jnp.float32)
    dbeta = jnp.sum(dout * y_BxLxKxD.astype(jnp.float32), axis=-1)
    dy = beta_BxLxN[..., None] * dout
  return (dbeta.astype(beta_BxLxN.dtype), dy.astype(y_BxLxKxD.dtype),
          dout_BxLxNxD.astype(res_dtype.dtype))


_add_branch.defvjp(_add_branch_fwd, _add_branch_bwd)
