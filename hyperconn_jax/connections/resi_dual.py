"""ResiDual (Pre-Post-LN, arXiv 2304.14802), a baseline of HC Table 4.

Two streams: x_a, a Post-Norm residual, and x_d, which sums every sub-layer's output as Pre-Norm
does:
  y = T(x_a);  x_a' = Norm(x_a + y);  x_d' = x_d + y
Both streams start as the embedding, as in microsoft/ResiDual (res = x). The output is
x_a + LN(x_d) (that code's `x * alpha + layer_norm(res)`, alpha = 1), and the model's final norm
then applies as it does for every kind. T has no pre-norm (x_a is already normalised). The
per-sub-layer norm is the model's (as residual_postnorm). The norm on x_d is a LayerNorm with a
learned scale, as in the paper, without its bias (this codebase has no biases).

HC-matrix form: streams (x_a, x_d) are X = [1, 0]^T, R = diag(1 / s, 1), E = [1 / s, 1] with s as
for Post-Norm (residual.py), and the output x_a + LN(x_d) reads X_out = [1, 1 / s_d]^T with s_d
the std of x_d (the LN's learned scale is left out).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import norms
from hyperconn_jax.connections import protocol, residual


class Streams(nnx.Module):
  """(x_a, x_d) on the stream axis: expand copies the embedding, reduce is x_a + LN(x_d)."""

  num_streams = 2

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del cfg, rngs
    self.dual_norm = norms.Norm(dim, kind='layernorm', eps=norm_eps, affine=True)

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, 2, D], a broadcast (no copy)."""
    return jnp.broadcast_to(h_BxLxD[..., None, :], (*h_BxLxD.shape[:-1], 2, h_BxLxD.shape[-1]))

  def reduce(self, x_BxLx2xD: jax.Array) -> jax.Array:
    """[B, L, 2, D] -> [B, L, D]: x_a + LN(x_d)."""
    return x_BxLx2xD[..., 0, :] + self.dual_norm(x_BxLx2xD[..., 1, :])

  def ends(self, x_BxLx2xD: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_s_BxL = norms.inv_std(x_BxLx2xD[..., 1, :], self.dual_norm)
    return (residual.ones(x_BxLx2xD.shape[:-2], 1, 2),
            jnp.stack([jnp.ones_like(inv_s_BxL), inv_s_BxL], axis=-1)[..., None])


class Connection(nnx.Module):
  """One ResiDual module around one sub-layer: (x_BxLx2xD, branch) -> x_BxLx2xD."""

  branch_prenorm = False

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del cfg, sublayer_index, rngs
    self.post_norm = norms.Norm(dim, kind=norm_kind, eps=norm_eps, affine=norm_kind == 'rmsnorm')

  def __call__(self, x_BxLx2xD: jax.Array, branch) -> jax.Array:
    x_a_BxLxD, x_d_BxLxD = x_BxLx2xD[..., 0, :], x_BxLx2xD[..., 1, :]
    y_BxLxD = branch(x_a_BxLxD)
    return jnp.stack([self.post_norm(x_a_BxLxD + y_BxLxD), x_d_BxLxD + y_BxLxD], axis=-2)

  def hc_form(self, x_BxLx2xD, h_BxLxD, y_BxLxD):
    """T reads x_a; x_a' = (x_a + y) / s, x_d' = x_d + y."""
    del x_BxLx2xD
    inv_s_BxL = norms.inv_std(h_BxLxD + y_BxLxD, self.post_norm)
    one, zero = jnp.ones_like(inv_s_BxL), jnp.zeros_like(inv_s_BxL)
    return ({'extract': jnp.stack([one, zero], axis=-1)[..., None],
             'res': jnp.stack([jnp.stack([inv_s_BxL, zero], -1), jnp.stack([zero, one], -1)], -2),
             'inject': jnp.stack([inv_s_BxL, one], axis=-1)[..., None, :]},
            {'inv_std': inv_s_BxL})


KIND = protocol.Kind(
    name='resi_dual', defaults=protocol.no_options, validate=protocol.no_validation,
    layout=lambda cfg, d_model: protocol.Layout(2, d_model, d_model), Streams=Streams,
    Connection=Connection)
