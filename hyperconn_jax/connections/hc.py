"""Hyper-Connections (HC, arXiv 2409.19606): static (SHC) and dynamic (DHC), HC Algorithm 2.

Per token, with streams H = (h_1 .. h_n) and HC matrix [[0, B], [A_m, A_r]]:
  Hbar = norm(H) per stream;  alpha = s_a * tanh(Hbar W_alpha) + [A_m | A_r];
  beta = s_b * tanh(Hbar W_beta) + B       (row i of alpha, entry i of beta: from h_i only)
  h_0 = sum_i alpha[i, 0] h_i;  h'_j = sum_i alpha[i, 1 + j] h_i;  out_j = beta_j T(h_0) + h'_j.
Static HC keeps only the static terms. `HyperConnectionBase` holds these coefficients;
Frac-Connections reuse it with fractions of the hidden state in place of streams.
"""

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax import params
from hyperconn_jax.connections import checks, mixing, protocol, residual

NAME = 'hc'


def static_dynamic_defaults() -> dict:
  """The options of HC's (and Frac-Connections') static and dynamic coefficients."""
  return dict(
      # Static (SHC / SFC) if False, static + dynamic (DHC / DFC) if True.
      dynamic=True,
      # Dynamic branch: tanh on the projection (paper default True; HC Table 1 'W/O tanh').
      tanh=True,
      # Dynamic branch: norm of each stream / fraction before the projection:
      # 'layernorm' (no affine, as OLMo) | 'rmsnorm' | 'none'.
      dynamic_norm='layernorm',
      # Give that norm a learnable scale (|theta_norm| = d, as OLMoE) if True.
      dynamic_norm_affine=False,
      # Dynamic branch: learnable scalar scales s_alpha, s_beta (FC 'W/O rescale' if False).
      scale=True,
      alpha_scale_init=0.01,
      beta_scale_init=0.01,
      # HC Table 3 ablations: train the width-connections (A_m, A_r: static and dynamic parts) / B.
      train_width=True,
      train_beta=True,
  )


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Expansion rate n (number of residual streams), any n >= 1.
      n=4,
      **static_dynamic_defaults(),
      # Home stream (A_m) of sub-layer k is (k + index_base) mod n, with k counted from 0:
      # attention of block l is k = 2l, its FFN k = 2l + 1.
      index_base=0,
      # HC section 4 rescales the init std of the output projections by sqrt(n); the paper does
      # not say in which direction: 'none' | 'divide' | 'multiply'.
      out_proj_sqrt_n='none',
  ))


def validate(cfg, d_model: int) -> None:
  del d_model  # Any width works.
  f = checks.Fields(cfg, NAME)
  f.integer('n', 1)
  f.integer('index_base', 0)
  f.one_of('out_proj_sqrt_n', checks.OUT_PROJ_SQRT_N)
  f.static_dynamic()


def copies_layout(cfg, d_model: int) -> protocol.Layout:
  """n copies of the model's width (hc, mhc, altup)."""
  return protocol.Layout(cfg.n, d_model, d_model)


def extra_flops(cfg, d_model: int) -> protocol.ExtraFlops:
  """Width connection (n streams -> n + 1 rows) and the dynamic projection (n + 2 columns)."""
  n = cfg.n
  return protocol.ExtraFlops(2 * n * (n + 1) * d_model
                             + (2 * n * d_model * (n + 2) if cfg.dynamic else 0))


def alpha_beta_form(alpha, beta, batch: tuple[int, ...]):
  """HC's (alpha [.., N, 1 + N], beta [.., N]) as the protocol's HC-matrix form and raw values."""
  alpha = jnp.broadcast_to(alpha, batch + alpha.shape[-2:])
  beta = jnp.broadcast_to(beta, batch + beta.shape[-1:])
  return ({'extract': alpha[..., :1], 'res': alpha[..., 1:], 'inject': beta[..., None, :]},
          {'alpha': alpha, 'beta': beta})


def _coefficient(kind: type, trainable: bool, value: jax.Array, axes: tuple) -> nnx.Variable:
  """A coefficient of type `kind`, or HCFrozen (no gradient, no update) if not `trainable`."""
  return (kind if trainable else params.HCFrozen)(value, out_sharding=axes)


class HyperConnectionBase(nnx.Module):
  """Static + dynamic coefficients alpha [.., N, M] and beta [.., N] of an (n+1)-row HC matrix.

  Parameters (the width connection alpha and its scale are frozen when cfg.train_width is False,
  beta and its scale when cfg.train_beta is False):
    static_alpha (N, M), static_beta (N,)                        HCStatic
    dynamic_alpha (W, M), dynamic_beta (W,), zero-initialised     HCDynamic   (dynamic only)
    alpha_scale (), beta_scale ()                                HCStatic    (dynamic and scale)
    norm_scale (W,)                                              NormScale   (dynamic and affine)
  where W is the width of one stream.
  """

  def _init_coefficients(self, cfg, *, static_alpha_NxM: jax.Array, width: int, width_axis,
                         norm_eps: float):
    num_streams = static_alpha_NxM.shape[0]
    train_alpha, train_beta = cfg.train_width, cfg.train_beta
    self.static_alpha = _coefficient(params.HCStatic, train_alpha,
                                     static_alpha_NxM.astype(jnp.float32), ('streams', 'hc'))
    self.static_beta = _coefficient(params.HCStatic, train_beta,
                                    jnp.ones((num_streams,), jnp.float32), ('streams',))
    self.dynamic = cfg.dynamic
    if not self.dynamic:
      return
    self.tanh = cfg.tanh
    self.norm_kind, self.norm_eps = cfg.dynamic_norm, norm_eps
    self.norm_scale = (params.NormScale(jnp.ones((width,), jnp.float32), out_sharding=(width_axis,))
                       if cfg.dynamic_norm_affine else None)
    self.dynamic_alpha = _coefficient(
        params.HCDynamic, train_alpha,
        jnp.zeros((width, static_alpha_NxM.shape[1]), jnp.float32), (width_axis, 'hc'))
    self.dynamic_beta = _coefficient(params.HCDynamic, train_beta,
                                     jnp.zeros((width,), jnp.float32), (width_axis,))
    if cfg.scale:
      self.alpha_scale = _coefficient(params.HCStatic, train_alpha,
                                      jnp.asarray(cfg.alpha_scale_init, jnp.float32), ())
      self.beta_scale = _coefficient(params.HCStatic, train_beta,
                                     jnp.asarray(cfg.beta_scale_init, jnp.float32), ())
    else:
      self.alpha_scale = self.beta_scale = None

  def coefficients(self, x_BxLxNxW: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns float32 (alpha, beta): [B, L, N, M] and [B, L, N] if dynamic, else [N, M] and [N]."""
    alpha_NxM = self.static_alpha[...].astype(jnp.float32)
    beta_N = self.static_beta[...].astype(jnp.float32)
    if not self.dynamic:
      return alpha_NxM, beta_N
    # One projection for W_alpha and W_beta together; the norm's scale folds into it.
    w_WxK = jnp.concatenate([self.dynamic_alpha[...], self.dynamic_beta[...][:, None]],
                            axis=1).astype(jnp.float32)
    if self.norm_scale is not None:
      w_WxK = self.norm_scale[...].astype(jnp.float32)[:, None] * w_WxK
    proj_BxLxNxK = mixing.normed_projection(x_BxLxNxW, w_WxK, self.norm_kind, self.norm_eps)
    if self.tanh:
      proj_BxLxNxK = jnp.tanh(proj_BxLxNxK)
    dyn_alpha_BxLxNxM, dyn_beta_BxLxN = proj_BxLxNxK[..., :-1], proj_BxLxNxK[..., -1]
    if self.alpha_scale is not None:
      dyn_alpha_BxLxNxM = self.alpha_scale[...].astype(jnp.float32) * dyn_alpha_BxLxNxM
      dyn_beta_BxLxN = self.beta_scale[...].astype(jnp.float32) * dyn_beta_BxLxN
    return dyn_alpha_BxLxNxM + alpha_NxM, dyn_beta_BxLxN + beta_N


class Streams(nnx.Module):
  """n residual streams: expand broadcasts h to every stream, reduce sums them (HC Algorithm 1)."""

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del dim, norm_eps, rngs
    self.num_streams = cfg.n

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, n, D], a broadcast (no copy)."""
    return jnp.broadcast_to(h_BxLxD[..., None, :],
                            (*h_BxLxD.shape[:-1], self.num_streams, h_BxLxD.shape[-1]))

  def reduce(self, x_BxLxNxD: jax.Array) -> jax.Array:
    """[B, L, n, D] -> [B, L, D]: the sum of the streams (accumulated in float32)."""
    return jnp.sum(x_BxLxNxD, axis=-2, dtype=jnp.float32).astype(x_BxLxNxD.dtype)

  def ends(self, x_BxLxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A broadcast in (E_0 = 1_{1xN}) and a sum out (X_out = 1_{Nx1})."""
    batch = x_BxLxNxD.shape[:-2]
    return (residual.ones(batch, 1, self.num_streams), residual.ones(batch, self.num_streams, 1))


class Connection(HyperConnectionBase):
  """One HC module around one sub-layer: (x_BxLxNxD, branch) -> x_BxLxNxD.

  Init (HC Eq. 14): B = 1, A_r = I, A_m = one-hot at (sublayer_index + index_base) mod n, dynamic
  weights 0; with identical streams this is Pre-Norm x + T(x) on every stream.
  """

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del norm_kind, rngs
    n = cfg.n
    # jax ops, since sublayer_index may be traced (blocks are created under nnx.vmap).
    home_N = jax.nn.one_hot((jnp.asarray(sublayer_index) + cfg.index_base) % n, n,
                            dtype=jnp.float32)
    static_alpha_NxM = jnp.concatenate([home_N[:, None], jnp.eye(n, dtype=jnp.float32)], axis=1)
    self._init_coefficients(cfg, static_alpha_NxM=static_alpha_NxM, width=dim,
                            width_axis='embed', norm_eps=norm_eps)

  def __call__(self, x_BxLxNxD: jax.Array, branch) -> jax.Array:
    alpha, beta = self.coefficients(x_BxLxNxD)
    # Row 0: the branch input h_0; rows 1..n: the mixed residual H' (one contraction).
    mix_BxLxMxD = mixing.mix_streams(alpha, x_BxLxNxD)
    y_BxLxD = branch(mix_BxLxMxD[..., 0, :])
    return mixing.add_branch(beta, y_BxLxD[..., None, :], mix_BxLxMxD[..., 1:, :])

  def hc_form(self, x_BxLxNxD, h_BxLxD, y_BxLxD):
    """Extract A_m, residual A_r, inject B (as a row)."""
    del h_BxLxD, y_BxLxD
    return alpha_beta_form(*self.coefficients(x_BxLxNxD), x_BxLxNxD.shape[:-2])


KIND = protocol.Kind(
    name=NAME, defaults=defaults, validate=validate, layout=copies_layout, Streams=Streams,
    Connection=Connection, extra_flops=extra_flops,
    out_proj_multiplier=lambda cfg: checks.out_proj_multiplier(cfg, cfg.n))
