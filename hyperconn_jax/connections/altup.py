"""AltUp (Alternating Updates, arXiv 2301.13310), a baseline of HC Table 4 ("AltUp x2").

K = model.connection.altup.n blocks x_1 .. x_K, each D wide. Around sub-layer k, with active block
j* = (k + index_base) mod K (AltUp's alternating choice):
  predict  xhat_i = sum_j P[i, j] x_j         (P: K x K learned scalars, init I)
  compute  xtilde = xhat_j* + T(xhat_j*)      (T: the sub-layer with its pre-norm)
  correct  out_i  = xhat_i + g_i (xtilde - xhat_j*) = xhat_i + g_i T(xhat_j*)   (g: K, init 1)
This is a static HC whose A_m is tied to row j* of the residual mix: alpha = [P^T e_j* | P^T],
beta = g (`coefficients` returns them in that form, so the analyses treat AltUp like HC).

The HC paper does not describe its AltUp setup, so three things here are choices:
- predict-correct wraps each sub-layer (attention, FFN) rather than each block;
- the embedding is not widened: the K blocks start as copies of the D-wide embedding, like HC's
  streams;
- the blocks are summed at the end (hc.Streams). Init therefore equals Pre-Norm.
"""

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax import params
from hyperconn_jax.connections import checks, hc, mixing, protocol

NAME = 'altup'
Streams = hc.Streams  # expand: K copies of the embedding; reduce: their sum.


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Number of blocks K.
      n=4,
      # Active block j* of sub-layer k is (k + index_base) mod K.
      index_base=0,
  ))


def validate(cfg, d_model: int) -> None:
  del d_model  # Any width works.
  f = checks.Fields(cfg, NAME)
  f.integer('n', 1)
  f.integer('index_base', 0)


class Connection(nnx.Module):
  """One AltUp module around one sub-layer: (x_BxLxNxD, branch) -> x_BxLxNxD.

  Parameters: predict (K, K) and correct (K,) HCStatic. The one-hot `active` (K,) (HCFrozen)
  marks block j*.
  """

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del dim, norm_kind, norm_eps, rngs
    k = self.num_streams = cfg.n
    self.predict = params.HCStatic(jnp.eye(k, dtype=jnp.float32), out_sharding=('streams', 'hc'))
    self.correct = params.HCStatic(jnp.ones((k,), jnp.float32), out_sharding=('streams',))
    # jax ops: sublayer_index may be traced (blocks are created under nnx.vmap).
    self.active = params.HCFrozen(
        jax.nn.one_hot((jnp.asarray(sublayer_index) + cfg.index_base) % k, k,
                       dtype=jnp.float32), out_sharding=('streams',))

  def coefficients(self, x_BxLxNxD: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns float32 HC-form (alpha [K, 1 + K], beta [K]); the same for every token."""
    del x_BxLxNxD
    p_KxK = self.predict[...].astype(jnp.float32)
    extract_K = self.active[...].astype(jnp.float32) @ p_KxK  # Row j* of P.
    return (jnp.concatenate([extract_K[:, None], p_KxK.T], axis=1),
            self.correct[...].astype(jnp.float32))

  def __call__(self, x_BxLxNxD: jax.Array, branch) -> jax.Array:
    alpha_NxM, beta_N = self.coefficients()
    mix_BxLxMxD = mixing.mix_streams(alpha_NxM, x_BxLxNxD)
    y_BxLxD = branch(mix_BxLxMxD[..., 0, :])
    return mixing.add_branch(beta_N, y_BxLxD[..., None, :], mix_BxLxMxD[..., 1:, :])

  def hc_form(self, x_BxLxNxD, h_BxLxD, y_BxLxD):
    del h_BxLxD, y_BxLxD
    return hc.alpha_beta_form(*self.coefficients(), x_BxLxNxD.shape[:-2])


KIND = protocol.Kind(
    name=NAME, defaults=defaults, validate=validate, layout=hc.copies_layout, Streams=Streams,
    Connection=Connection,
    # The width connection (K blocks -> 1 + K rows); the depth connection is elementwise.
    extra_flops=lambda cfg, d_model: protocol.ExtraFlops(2 * cfg.n * (cfg.n + 1) * d_model))
