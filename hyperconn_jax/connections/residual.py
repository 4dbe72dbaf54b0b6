"""The baselines: residual_prenorm (x + T(Norm(x))) and residual_postnorm (Norm(x + T(x)))."""

import jax
from flax import nnx

from hyperconn_jax import norms


def validate(config, d_model: int) -> None:
  del config, d_model  # The residual baselines have no options of their own.


class Streams(nnx.Module):
  """One stream: expand adds a stream axis of size 1, reduce removes it."""

  num_streams = 1

  def __init__(self, config, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del config, dim, norm_eps, rngs

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    return h_BxLxD[..., None, :]

  def reduce(self, x_BxLx1xD: jax.Array) -> jax.Array:
    return x_BxLx1xD[..., 0, :]


class Connection(nnx.Module):
  """x + T(x) (Pre-Norm: T owns its norm) or Norm(x + T(x)) (Post-Norm: T has no norm)."""

  def __init__(self, config, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del sublayer_index, rngs
    self.branch_prenorm = config.kind == 'residual_prenorm'
    self.post_norm = (None if self.branch_prenorm else
                      norms.Norm(dim, kind=norm_kind, eps=norm_eps, affine=norm_kind == 'rmsnorm'))

  def __call__(self, x_BxLx1xD: jax.Array, branch) -> jax.Array:
    h_BxLxD = x_BxLx1xD[..., 0, :]
    h_BxLxD = h_BxLxD + branch(h_BxLxD)
    if self.post_norm is not None:
      h_BxLxD = self.post_norm(h_BxLxD)
    return h_BxLxD[..., None, :]
