"""The two large contractions every hyper-connection performs, in the streams' dtype.

Coefficients arrive in float32 and are cast to the streams' dtype; contractions accumulate in
float32. A coefficient tensor without leading batch axes is shared by every token (static HC).
"""

import jax
import jax.numpy as jnp


def mix_streams(coef_NxM: jax.Array, x_BxLxNxD: jax.Array) -> jax.Array:
  """Width connection: returns y[..., m, :] = sum_n coef[..., n, m] x[..., n, :] in x's dtype.

  Args:
    coef_NxM: [N, M] (shared by all tokens) or [B, L, N, M] (per token), any float dtype.
    x_BxLxNxD: the streams [B, L, N, D].
  """
  spec = 'nm,...nd->...md' if coef_NxM.ndim == 2 else '...nm,...nd->...md'
  y_BxLxMxD = jnp.einsum(spec, coef_NxM.astype(x_BxLxNxD.dtype), x_BxLxNxD,
                         preferred_element_type=jnp.float32)
  return y_BxLxMxD.astype(x_BxLxNxD.dtype)


def add_branch(beta_N: jax.Array, y_BxLxNxD: jax.Array, res_BxLxNxD: jax.Array) -> jax.Array:
  """Depth connection: returns beta[..., n] * y[..., n, :] + res[..., n, :] in res's dtype.

  Args:
    beta_N: [N] or [B, L, N] float32 weights of the branch output per stream.
    y_BxLxNxD: the branch output, broadcastable to res (HC passes [B, L, 1, D]).
    res_BxLxNxD: the mixed residual streams [B, L, N, D].
  """
  out = (beta_N[..., None] * y_BxLxNxD.astype(jnp.float32)
         + res_BxLxNxD.astype(jnp.float32))
  return out.astype(res_BxLxNxD.dtype)
