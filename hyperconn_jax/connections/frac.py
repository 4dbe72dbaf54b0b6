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
import ml_collections

from hyperconn_jax.connections import checks, hc, mixing, protocol

NAME = 'frac'


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Frac-rate m (the hidden size is split into m fractions); m must divide model.d_model.
      m=4,
      **hc.static_dynamic_defaults(),
  ))


def validate(cfg, d_model: int) -> None:
  f = checks.Fields(cfg, NAME)
  f.integer('m', 1)
  if d_model % cfg.m:
    f.fail('m', cfg.m, f'a divisor of model.d_model = {d_model}')
  f.static_dynamic()


def layout(cfg, d_model: int) -> protocol.Layout:
  return protocol.Layout(cfg.m, d_model // cfg.m, d_model)


def extra_flops(cfg, d_model: int) -> protocol.ExtraFlops:
  """Width connection (m fractions -> 2m rows of D/m) and the dynamic projection (2m + 1 columns
  of D/m per fraction)."""
  m = cfg.m
  return protocol.ExtraFlops(4 * m * d_model + (2 * d_model * (2 * m + 1) if cfg.dynamic else 0))


def eye(n: int, batch: tuple[int, ...]) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), batch + (n, n))


class Streams(nnx.Module):
  """m fractions: expand splits D into (m, D/m), reduce concatenates them back (no sum pooling)."""

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del dim, norm_eps, rngs
    self.num_streams = cfg.m

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, m, D/m]."""
    return h_BxLxD.reshape(*h_BxLxD.shape[:-1], self.num_streams, -1)

  def reduce(self, x_BxLxMxF: jax.Array) -> jax.Array:
    """[B, L, m, D/m] -> [B, L, D]."""
    return x_BxLxMxF.reshape(*x_BxLxMxF.shape[:-2], -1)

  def ends(self, x_BxLxMxF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A split in (E_0 = I) and a concatenation out (X_out = I)."""
    batch = x_BxLxMxF.shape[:-2]
    return eye(self.num_streams, batch), eye(self.num_streams, batch)


class Connection(hc.HyperConnectionBase):
  """One FC module around one sub-layer: (x_BxLxMxF, branch) -> x_BxLxMxF with F = D/m.

  The dynamic norm, W_alpha (F, 2m) and W_beta (F,) act on one fraction; their F axis is replicated
  (it need not divide the mesh axis that 'embed' maps to).
  """

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del sublayer_index, norm_kind, rngs  # FC has no layer-dependent init.
    m = cfg.m
    eye_MxM = jnp.eye(m, dtype=jnp.float32)
    self._init_coefficients(cfg, static_alpha_NxM=jnp.concatenate([eye_MxM, eye_MxM], axis=1),
                            width=dim // m, width_axis=None, norm_eps=norm_eps)
    self.num_fracs = m

  def __call__(self, x_BxLxMxF: jax.Array, branch) -> jax.Array:
    alpha, beta = self.coefficients(x_BxLxMxF)
    # Rows :m are the (mixed) fractions of the branch input, rows m: the mixed residual.
    mix_BxLx2MxF = mixing.mix_streams(alpha, x_BxLxMxF)
    m = self.num_fracs
    y_BxLxD = branch(mix_BxLx2MxF[..., :m, :].reshape(*x_BxLxMxF.shape[:-2], -1))
    return mixing.add_branch(beta, y_BxLxD.reshape(x_BxLxMxF.shape), mix_BxLx2MxF[..., m:, :])

  def hc_form(self, x_BxLxMxF, h_BxLxD, y_BxLxD):
    """Extract Y, residual A, inject diag(B): fraction q of T's output goes to fraction q only."""
    del h_BxLxD, y_BxLxD
    batch, m = x_BxLxMxF.shape[:-2], self.num_fracs
    alpha, beta = self.coefficients(x_BxLxMxF)
    alpha = jnp.broadcast_to(alpha, batch + alpha.shape[-2:])
    beta = jnp.broadcast_to(beta, batch + beta.shape[-1:])
    return ({'extract': alpha[..., :m], 'res': alpha[..., m:],
             'inject': beta[..., None] * eye(m, batch)}, {'alpha': alpha, 'beta': beta})


KIND = protocol.Kind(name=NAME, defaults=defaults, validate=validate, layout=layout,
                     Streams=Streams, Connection=Connection, extra_flops=extra_flops)
