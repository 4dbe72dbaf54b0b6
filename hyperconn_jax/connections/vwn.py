"""Virtual Width Networks (VWN, arXiv 2511.11238): an over-width embedding around a backbone of
width D, mixed by Generalized Hyper-Connections (GHC).

With m | D and F = D/m, the residual state is n segments of width F (an over-width state of
E = n F = (n/m) D); the backbone (attention, FFN) reads and writes m segments (width D). Per
token, with H' the n x F segments and GHC matrix [[0_{mxm}, B], [A_e, A_r]]:
  Hbar = RMSNorm(H') per segment (no scale);  tau = sqrt(F)
  A = S_a o tanh(Hbar W_a / tau) + [A_e | A_r]          (n x (m + n); W_a: F x (m + n))
  B = S_b o tanh(Hbar W_b / tau)^T + B_static           (m x n;      W_b: F x m)
  branch input = Reshape(A_e^T H', (D,));  H'_out = B^T Reshape(T(input), (m, F)) + A_r^T H'
Init (VWN section 3): W_a = W_b = 0, S_a = S_b = 1 (matrices), B_static[i, j] = 1 iff i = j mod m,
A_e = [I_m; 0], A_r = I_n. The embedding is E wide (the model builds it from `layout`), cut into
the n segments by `expand`; `reduce` is h = Linear(GroupNorm(H')) with W_reduce: E x D, before
the model's final norm and unembedding.

Where the paper is silent or ambiguous, the choice is an option of model.connection.vwn:
- reduce_norm: 'group' normalises each group of D channels of the flattened state (the paper's
  "group size D"; needs m | n), without affine parameters (this codebase's norms have no bias);
  'none' drops it (the paper omits it in its 1.5x (m, n) = (2, 3) setting).
- reduce_init: the paper gives no init for W_reduce. 'cyclic' (default) makes output segment q the
  mean of the segments j with j mod m = q (the segments B_static writes fraction q of the branch
  output to), so at n = m it is the identity; 'normal' draws N(0, 1/E).
- the embedding is a full E-wide table (the paper's option of a low-rank W_expand E_base is not
  implemented), so it cannot be tied to the D-wide unembedding: VWN needs
  model.tie_embeddings=False when E != D (models.validate says so).
- a static variant (dynamic=False) keeps only B_static, A_e, A_r (as SHC / SFC).
At n = m the embedding is D wide, the GHC matrix is Frac-Connections' (A_e = Y, A_r = A and
B = diag(beta) while B stays diagonal) and the 'cyclic' reduce is the concatenation, so a static
VWN with n = m and reduce_norm='none' is SFC x m (tests/test_vwn.py).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax import norms, params
from hyperconn_jax.connections import checks, mixing, protocol

NAME = 'vwn'
REDUCE_NORMS = ('group', 'none')
REDUCE_INITS = ('cyclic', 'normal')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Backbone segments m (width D/m each; m must divide model.d_model) and over-width segments
      # n >= m: the embedding and residual state are (n/m) D wide (virtual width factor n/m).
      m=2,
      n=4,
      # Static + dynamic GHC (DGHC) if True, static only if False.
      dynamic=True,
      # Final reduction Linear(GroupNorm(H')): 'group' (groups of D channels; needs m | n) | 'none'.
      reduce_norm='group',
      # Init of W_reduce: 'cyclic' (mean of the segments each backbone segment is written to) |
      # 'normal' (N(0, 1/E)).
      reduce_init='cyclic',
  ))


def validate(cfg, d_model: int) -> None:
  f = checks.Fields(cfg, NAME)
  f.integer('m', 1)
  if d_model % cfg.m:
    f.fail('m', cfg.m, f'a divisor of model.d_model = {d_model}')
  f.integer('n', cfg.m)
  if not isinstance(cfg.dynamic, bool):
    f.fail('dynamic', cfg.dynamic, 'True or False')
  f.one_of('reduce_norm', REDUCE_NORMS)
  f.one_of('reduce_init', REDUCE_INITS)
  if cfg.reduce_norm == 'group' and cfg.n % cfg.m:
    f.fail('reduce_norm', cfg.reduce_norm,
           f"'none' when m = {cfg.m} does not divide n = {cfg.n} (groups of D channels)")


def layout(cfg, d_model: int) -> protocol.Layout:
  width = d_model // cfg.m
  return protocol.Layout(cfg.n, width, cfg.n * width)


def extra_flops(cfg, d_model: int) -> protocol.ExtraFlops:
  """Per sub-layer: width connection (n segments -> m + n rows of F), depth connection (m -> n)
  and the dynamic projection (2m + n columns); per token: W_reduce (E x D)."""
  m, n, width = cfg.m, cfg.n, d_model // cfg.m
  per_sublayer = (2 * n * (m + n) * width + 2 * m * n * width
                  + (2 * n * width * (2 * m + n) if cfg.dynamic else 0))
  return protocol.ExtraFlops(per_sublayer, 2 * n * width * d_model)


def _cyclic(m: int, n: int) -> jax.Array:
  """[m, n] float32: 1 where i = j mod m."""
  return (jnp.arange(n)[None, :] % m == jnp.arange(m)[:, None]).astype(jnp.float32)


class Streams(nnx.Module):
  """expand: the E-wide embedding -> n segments of F; reduce: Linear(GroupNorm(H')) -> D.

  Parameter: reduce_proj (E, D) nnx.Param (float32; weight-decayed like any linear).
  """

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    self.num_streams, self.m, self.dim, self.eps = cfg.n, cfg.m, dim, norm_eps
    width = dim // cfg.m
    wide = cfg.n * width
    self.group_norm = cfg.reduce_norm == 'group'
    if cfg.reduce_init == 'cyclic':
      cyclic_MxN = _cyclic(cfg.m, cfg.n)
      segments_NxM = (cyclic_MxN / jnp.sum(cyclic_MxN, axis=1, keepdims=True)).T
      w_ExD = jnp.kron(segments_NxM, jnp.eye(width, dtype=jnp.float32))
    else:
      w_ExD = jax.random.normal(rngs.params(), (wide, dim), jnp.float32) / math.sqrt(wide)
    self.reduce_proj = nnx.Param(w_ExD, out_sharding=(None, 'embed'))

  def expand(self, h_BxLxE: jax.Array) -> jax.Array:
    """[B, L, E] -> [B, L, n, F]."""
    return h_BxLxE.reshape(*h_BxLxE.shape[:-1], self.num_streams, -1)

  def _normed(self, x_BxLxNxF: jax.Array) -> jax.Array:
    """The flattened state [B, L, E], group-normalised over groups of D channels if asked."""
    h_BxLxE = x_BxLxNxF.reshape(*x_BxLxNxF.shape[:-2], -1)
    if not self.group_norm:
      return h_BxLxE
    groups = h_BxLxE.reshape(*h_BxLxE.shape[:-1], -1, self.dim)
    return norms.normalize(groups, 'layernorm', self.eps).astype(h_BxLxE.dtype).reshape(
        h_BxLxE.shape)

  def reduce(self, x_BxLxNxF: jax.Array) -> jax.Array:
    """[B, L, n, F] -> [B, L, D]."""
    h_BxLxE = self._normed(x_BxLxNxF)
    return jnp.einsum('ble,ed->bld', h_BxLxE, self.reduce_proj[...].astype(h_BxLxE.dtype),
                      preferred_element_type=jnp.float32).astype(x_BxLxNxF.dtype)

  def ends(self, x_BxLxNxF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """E_0 = I_n (each embedding segment enters its own stream); X_out [n, m]: the mean diagonal
    of each F x F block of W_reduce (segment j -> output segment q; the group norm and the
    off-diagonal part of each block are left out)."""
    batch, n, m = x_BxLxNxF.shape[:-2], self.num_streams, self.m
    width = x_BxLxNxF.shape[-1]
    blocks = self.reduce_proj[...].astype(jnp.float32).reshape(n, width, m, width)
    x_out_NxM = jnp.mean(jnp.diagonal(blocks, axis1=1, axis2=3), axis=-1)
    return (jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), batch + (n, n)),
            jnp.broadcast_to(x_out_NxM, batch + (n, m)))


class Connection(nnx.Module):
  """One (D)GHC module around one sub-layer: (x_BxLxNxF, branch) -> x_BxLxNxF.

  Parameters: static_alpha (n, m + n) = [A_e | A_r] and static_beta (m, n) = B_static, HCStatic;
  if dynamic: dynamic_alpha (F, m + n) and dynamic_beta (F, m) HCDynamic zero-init, alpha_scale
  (n, m + n) and beta_scale (m, n) HCStatic = 1.
  """

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del sublayer_index, norm_kind, rngs  # VWN's init does not depend on the layer.
    m, n = self.m, self.n = cfg.m, cfg.n
    width = dim // m
    self.eps, self.inv_tau = norm_eps, 1.0 / math.sqrt(width)
    static_alpha = jnp.concatenate([jnp.eye(n, m, dtype=jnp.float32),
                                    jnp.eye(n, dtype=jnp.float32)], axis=1)
    self.static_alpha = params.HCStatic(static_alpha, out_sharding=('streams', 'hc'))
    self.static_beta = params.HCStatic(_cyclic(m, n), out_sharding=('hc', 'streams'))
    self.dynamic = cfg.dynamic
    if self.dynamic:
      self.dynamic_alpha = params.HCDynamic(jnp.zeros((width, m + n), jnp.float32),
                                            out_sharding=(None, 'hc'))
      self.dynamic_beta = params.HCDynamic(jnp.zeros((width, m), jnp.float32),
                                           out_sharding=(None, 'hc'))
      self.alpha_scale = params.HCStatic(jnp.ones((n, m + n), jnp.float32),
                                         out_sharding=('streams', 'hc'))
      self.beta_scale = params.HCStatic(jnp.ones((m, n), jnp.float32),
                                        out_sharding=('hc', 'streams'))

  def coefficients(self, x_BxLxNxF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns float32 (A [.., n, m + n], B [.., m, n]): [B, L, ...] if dynamic, else static."""
    alpha = self.static_alpha[...].astype(jnp.float32)
    beta = self.static_beta[...].astype(jnp.float32)
    if not self.dynamic:
      return alpha, beta
    w_FxK = jnp.concatenate([self.dynamic_alpha[...], self.dynamic_beta[...]], axis=1)
    proj_BxLxNxK = jnp.tanh(self.inv_tau * mixing.normed_projection(
        x_BxLxNxF, w_FxK, 'rmsnorm', self.eps))
    k = self.m + self.n
    alpha = self.alpha_scale[...].astype(jnp.float32) * proj_BxLxNxK[..., :k] + alpha
    beta = (self.beta_scale[...].astype(jnp.float32)
            * jnp.swapaxes(proj_BxLxNxK[..., k:], -1, -2) + beta)
    return alpha, beta

  def __call__(self, x_BxLxNxF: jax.Array, branch) -> jax.Array:
    alpha, beta = self.coefficients(x_BxLxNxF)
    # Rows :m are the branch input's m segments, rows m: the mixed residual (one contraction).
    mix_BxLxKxF = mixing.mix_streams(alpha, x_BxLxNxF)
    m, batch = self.m, x_BxLxNxF.shape[:-2]
    y_BxLxD = branch(mix_BxLxKxF[..., :m, :].reshape(*batch, -1))
    out_BxLxNxF = mixing.mix_streams(beta, y_BxLxD.reshape(*batch, m, -1).astype(x_BxLxNxF.dtype))
    return (out_BxLxNxF.astype(jnp.float32)
            + mix_BxLxKxF[..., m:, :].astype(jnp.float32)).astype(x_BxLxNxF.dtype)

  def hc_form(self, x_BxLxNxF, h_BxLxD, y_BxLxD):
    """Extract A_e [n, m], residual A_r [n, n], inject B [m, n]."""
    del h_BxLxD, y_BxLxD
    batch, m = x_BxLxNxF.shape[:-2], self.m
    alpha, beta = self.coefficients(x_BxLxNxF)
    alpha = jnp.broadcast_to(alpha, batch + alpha.shape[-2:])
    beta = jnp.broadcast_to(beta, batch + beta.shape[-2:])
    return ({'extract': alpha[..., :m], 'res': alpha[..., m:], 'inject': beta},
            {'alpha': alpha, 'beta': beta})


KIND = protocol.Kind(name=NAME, defaults=defaults, validate=validate, layout=layout,
                     Streams=Streams, Connection=Connection, extra_flops=extra_flops)
