"""Frac-Connections (FC, arXiv 2503.14125): static (SFC) and dynamic (DFC), FC Algorithms 2-3.

The hidden state h (D) is split into m fractions H = Reshape(h, (m, D/m)) instead of being copied.
Per token, with FC matrix [[0, B], [Y, A]] (HC's coefficients with fractions as streams):
  alpha = s_a * tanh(Hbar W_alpha) + [Y | A]  (m x 2m),  beta = s_b * tanh(Hbar W_beta) + B  (m)
  mix = alpha^T H (2m rows);  T input = Reshape(mix[:m], (D,));
  out = beta[:, None] * Reshape(T(input), (m, D/m)) + mix[m:].
Init (FC Eq. 15): B = 1, Y = A = I, dynamic weights 0: exactly Pre-Norm x + T(x) after reduce.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax.connections import checks, hc, mixing


def validate(config, d_model: int) -> None:
  checks.integer(config, 'm', 1)
  if d_model % config.m:
    checks.fail('m', config.m, f'a divisor of model.d_model = {d_model}')
  checks.static_dynamic(config)


class Streams(nnx.Module):
  """m fractions: expand splits D into (m, D/m), reduce concatenates them back (no sum pooling)."""

  def __init__(self, config, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del dim, norm_eps, rngs
    self.num_streams = config.m

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, m, D/m]."""
    return h_BxLxD.reshape(*h_BxLxD.shape[:-1], self.num_streams, -1)

  def reduce(self, x_BxLxMxF: jax.Array) -> jax.Array:
    """[B, L, m, D/m] -> [B, L, D]."""
    return x_BxLxMxF.reshape(*x_BxLxMxF.shape[:-2], -1)


class Connection(hc.HyperConnectionBase):
  """One FC module around one sub-layer: (x_BxLxMxF, branch) -> x_BxLxMxF with F = D/m.

  The dynamic norm, W_alpha (F, 2m) and W_beta (F,) act on one fraction; their F axis is replicated
  (it need not divide the mesh axis that 'embed' maps to).
  """

  branch_prenorm = True

  def __init__(self, config, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del sublayer_index, norm_kind, rngs  # FC has no layer-dependent init.
    m = config.m
    eye_MxM = jnp.eye(m, dtype=jnp.float32)
    self._init_coefficients(config, static_alpha_NxM=jnp.concatenate([eye_MxM, eye_MxM], axis=1),
                            width=dim // m, width_axis=None, norm_eps=norm_eps)
    self.num_fracs = m

  def __call__(self, x_BxLxMxF: jax.Array, branch) -> jax.Array:
    alpha, beta = self.coefficients(x_BxLxMxF)
    # Rows :m are the (mixed) fractions of the branch input, rows m: the mixed residual.
    mix_BxLx2MxF = mixing.mix_streams(alpha, x_BxLxMxF)
    m = self.num_fracs
    y_BxLxD = branch(mix_BxLx2MxF[..., :m, :].reshape(*x_BxLxMxF.shape[:-2], -1))
    return mixing.add_branch(beta, y_BxLxD.reshape(x_BxLxMxF.shape), mix_BxLx2MxF[..., m:, :])
