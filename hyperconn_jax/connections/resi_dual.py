"""ResiDual (Pre-Post-LN, arXiv 2304.14802), a baseline of HC Table 4.

Two streams: x_a, a Post-Norm residual, and x_d, which sums every sub-layer's output as Pre-Norm
does:
  y = T(x_a);  x_a' = Norm(x_a + y);  x_d' = x_d + y
Both streams start as the embedding, as in microsoft/ResiDual (res = x). The output is
x_a + LN(x_d) (that code's `x * alpha + layer_norm(res)`, alpha = 1), and the model's final norm
then applies as it does for every kind. T has no pre-norm (x_a is already normalised). The
per-sub-layer norm is the model's (as residual_postnorm). The norm on x_d is a LayerNorm with a
learned scale, as in the paper, without its bias (this codebase has no biases).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import norms


def validate(config, d_model: int) -> None:
  del config, d_model  # ResiDual has no options.


class Streams(nnx.Module):
  """(x_a, x_d) on the stream axis: expand copies the embedding, reduce is x_a + LN(x_d)."""

  num_streams = 2

  def __init__(self, config, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del config, rngs
    self.dual_norm = norms.Norm(dim, kind='layernorm', eps=norm_eps, affine=True)

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, 2, D], a broadcast (no copy)."""
    return jnp.broadcast_to(h_BxLxD[..., None, :], (*h_BxLxD.shape[:-1], 2, h_BxLxD.shape[-1]))

  def reduce(self, x_BxLx2xD: jax.Array) -> jax.Array:
    """[B, L, 2, D] -> [B, L, D]: x_a + LN(x_d)."""
    return x_BxLx2xD[..., 0, :] + self.dual_norm(x_BxLx2xD[..., 1, :])


class Connection(nnx.Module):
  """One ResiDual module around one sub-layer: (x_BxLx2xD, branch) -> x_BxLx2xD."""

  branch_prenorm = False

  def __init__(self, config, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del config, sublayer_index, rngs
    self.post_norm = norms.Norm(dim, kind=norm_kind, eps=norm_eps, affine=norm_kind == 'rmsnorm')

  def __call__(self, x_BxLx2xD: jax.Array, branch) -> jax.Array:
    x_a_BxLxD, x_d_BxLxD = x_BxLx2xD[..., 0, :], x_BxLx2xD[..., 1, :]
    y_BxLxD = branch(x_a_BxLxD)
    return jnp.stack([self.post_norm(x_a_BxLxD + y_BxLxD), x_d_BxLxD + y_BxLxD], axis=-2)
