"""The baselines: residual_prenorm (x + T(Norm(x))) and residual_postnorm (Norm(x + T(x))).

HC-matrix form (HC App. G): Pre-Norm is X = R = E = [[1]]; Post-Norm Norm(h + T(h)) is X = [[1]],
R = E = [[1 / s]] with s the token's std (RMS for rmsnorm) of h + T(h) (centring and any affine
scale are folded into the next layer).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import norms
from hyperconn_jax.connections import protocol


def ones(batch: tuple[int, ...], rows: int, cols: int) -> jax.Array:
  return jnp.ones(batch + (rows, cols), jnp.float32)


class Streams(nnx.Module):
  """One stream: expand adds a stream axis of size 1, reduce removes it."""

  num_streams = 1

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del cfg, dim, norm_eps, rngs

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    return h_BxLxD[..., None, :]

  def reduce(self, x_BxLx1xD: jax.Array) -> jax.Array:
    return x_BxLx1xD[..., 0, :]

  def ends(self, x_BxLx1xD: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch = x_BxLx1xD.shape[:-2]
    return ones(batch, 1, 1), ones(batch, 1, 1)


class PreNormConnection(nnx.Module):
  """x + T(x), where T owns its norm."""

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del cfg, dim, sublayer_index, norm_kind, norm_eps, rngs

  def __call__(self, x_BxLx1xD: jax.Array, branch) -> jax.Array:
    h_BxLxD = x_BxLx1xD[..., 0, :]
    return (h_BxLxD + branch(h_BxLxD))[..., None, :]

  def hc_form(self, x_BxLx1xD, h_BxLxD, y_BxLxD):
    del h_BxLxD, y_BxLxD
    one = ones(x_BxLx1xD.shape[:-2], 1, 1)
    return {'extract': one, 'res': one, 'inject': one}, {}


class PostNormConnection(nnx.Module):
  """Norm(x + T(x)), where T has no norm (the model's norm kind, a learned scale for RMSNorm)."""

  branch_prenorm = False

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del cfg, sublayer_index, rngs
    self.post_norm = norms.Norm(dim, kind=norm_kind, eps=norm_eps, affine=norm_kind == 'rmsnorm')

  def __call__(self, x_BxLx1xD: jax.Array, branch) -> jax.Array:
    h_BxLxD = x_BxLx1xD[..., 0, :]
    return self.post_norm(h_BxLxD + branch(h_BxLxD))[..., None, :]

  def hc_form(self, x_BxLx1xD, h_BxLxD, y_BxLxD):
    inv_s_BxL = norms.inv_std(h_BxLxD + y_BxLxD, self.post_norm)
    scale = inv_s_BxL[..., None, None]
    return ({'extract': ones(x_BxLx1xD.shape[:-2], 1, 1), 'res': scale, 'inject': scale},
            {'inv_std': inv_s_BxL})


PRENORM = protocol.Kind(
    name='residual_prenorm', defaults=protocol.no_options, validate=protocol.no_validation,
    layout=protocol.single_stream, Streams=Streams, Connection=PreNormConnection)
POSTNORM = protocol.Kind(
    name='residual_postnorm', defaults=protocol.no_options, validate=protocol.no_validation,
    layout=protocol.single_stream, Streams=Streams, Connection=PostNormConnection)
