"""mHC: Manifold-Constrained Hyper-Connections (arXiv 2512.24880), fused form (mHC Eqs. 14-19).

Per token, with streams x (n x D) flattened to x_vec (nD):
  x~ = x_vec * rsqrt(mean(x_vec^2) + eps)                       (unweighted RMSNorm over nD)
  [l_pre | l_post | l_res] = [a_pre, a_post, a_res] * (x~ phi) + b   (phi: nD x (n^2 + 2n))
  H_pre = sigmoid(l_pre), H_post = post_mult * sigmoid(l_post), H_res = Sinkhorn(exp(mat(l_res)))
  out_j = sum_i H_res[j, i] x_i + H_post[j] * F(sum_i H_pre[i] x_i)
mat() is row-major: l_res[j * n + i] is the logit of H_res[j, i]. A mapping missing from
model.connection.mhc.mappings is fixed and has no parameters (H_pre = 1/n, H_post = 1, H_res = I;
mHC Table 1).
The final reduction is a sum or DeepSeek TileKernels' learned head (mhc_head).

Why H_pre starts on a home stream by default (model.connection.mhc.pre_init; the paper gives no
init): the embedding is replicated into n equal streams, and phi starts at 0. With H_pre = 1/n,
everything is symmetric under permuting the streams, so every stream gets the same gradient and
the streams stay equal for the whole of training. While they are equal, H_res x is the same for
any row-stochastic H_res, and H_res gets no gradient. mHC then trains as a one-stream residual
with gates. 'home' puts most of H_pre on stream (k + index_base) mod n of sub-layer k, as HC's
A_m = e_(k mod n) does. The streams then get different gradients, H_post learns per-stream
values, the streams separate and H_res learns. The sum over streams still starts at 1, so init
still equals Pre-Norm. With H_post fixed (mappings without 'post'), H_post = 1 adds the same
output to every stream, so equal streams stay equal whatever H_pre is, and H_res is inert in
exact arithmetic. The mHC Table 1 row 'H_res' then equals Pre-Norm, and 'H_res + H_pre' equals
Pre-Norm with a learned scale (sum_i H_pre[i]) on each branch input.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax import params
from hyperconn_jax.connections import checks, hc, mixing, protocol, residual
from hyperconn_jax.connections.sinkhorn import sinkhorn

NAME = 'mhc'
MAPPINGS = ('pre', 'post', 'res')
PRE_INITS = ('home', 'uniform')
RES_INITS = ('identity', 'uniform')
REDUCES = ('sum', 'head')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Expansion rate n (number of residual streams).
      n=4,
      # Sinkhorn-Knopp iterations (paper t_max = 20).
      sinkhorn_iters=20,
      # H_post = post_mult * sigmoid(.) (paper 2).
      post_mult=2.0,
      # Scalar gates alpha^pre, alpha^post, alpha^res init (paper 0.01).
      gate_init=0.01,
      # Static H_res logits at init: 'identity' (diagonal 0, off-diagonal res_offdiag_logit, so
      # the model starts near Pre-Norm) | 'uniform' (all 0: Sinkhorn gives the 1/n matrix).
      res_init='identity',
      res_offdiag_logit=-4.0,
      # Static H_pre at init (the paper gives none): 'home' (1 - (n-1) * pre_off_home on stream
      # (k + index_base) mod n of sub-layer k, pre_off_home on the others, as HC's A_m) |
      # 'uniform' (1/n: the streams then stay equal all through training and H_res never
      # learns; the module docstring explains why).
      pre_init='home',
      pre_off_home=0.01,
      # Which mappings are learned; a missing one is fixed (H_pre = 1/n, H_post = 1, H_res = I),
      # as in the mHC paper's Table 1 ablation. Any subset of ('pre', 'post', 'res').
      mappings=('pre', 'post', 'res'),
      # Final reduction: 'sum' | 'head' (learned sigmoid-weighted sum, as DeepSeek's TileKernels).
      reduce='sum',
      # Home stream of sub-layer k (pre_init='home') is (k + index_base) mod n.
      index_base=0,
      # HC section 4's sqrt(n) on the output projections' init std: 'none' | 'divide' | 'multiply'.
      out_proj_sqrt_n='none',
  ))


def validate(cfg, d_model: int) -> None:
  del d_model  # Any width works.
  f = checks.Fields(cfg, NAME)
  f.integer('n', 1)
  f.integer('sinkhorn_iters', 1)
  f.greater('post_mult', 1)
  f.one_of('res_init', RES_INITS)
  f.one_of('pre_init', PRE_INITS)
  f.integer('index_base', 0)
  f.one_of('out_proj_sqrt_n', checks.OUT_PROJ_SQRT_N)
  if cfg.pre_init == 'home' and cfg.n > 1 and not 0 < cfg.pre_off_home < 1 / cfg.n:
    f.fail('pre_off_home', cfg.pre_off_home,
           f"in (0, 1/n) = (0, {1 / cfg.n:.4g}) for pre_init='home' (the home stream "
           'must get the largest weight)')
  f.one_of('reduce', REDUCES)
  mappings = cfg.mappings
  if isinstance(mappings, str) or not set(mappings) <= set(MAPPINGS):
    f.fail('mappings', mappings, f'a tuple holding any subset of {MAPPINGS}')
  if cfg.n == 1 and ('pre' in mappings or cfg.reduce == 'head'):
    f.fail('n', cfg.n, '>= 2 with a learned H_pre or reduce=\'head\' '
           '(their init logit(1/n) is infinite at n = 1)')


def extra_flops(cfg, d_model: int) -> protocol.ExtraFlops:
  """Width connection (n streams -> n + 1 rows) and the projection of the flattened streams
  (n^2 + 2n columns); the head's projection when reduce='head'."""
  n = cfg.n
  return protocol.ExtraFlops(2 * n * (n + 1) * d_model + 2 * n * d_model * (n * n + 2 * n),
                             2 * n * d_model * n + 2 * n * d_model if cfg.reduce == 'head' else 0.0)


def _logit(p: float) -> float:
  return math.log(p / (1.0 - p))


def _scalar(value: float) -> params.HCStatic:
  return params.HCStatic(jnp.asarray(value, jnp.float32), out_sharding=())


def _normed_projection(x_BxLxNxD: jax.Array, phi_NxDxK: jax.Array, eps: float) -> jax.Array:
  """(x~ phi) in float32, [B, L, K]: the projection first, then the RMS of the flattened x."""
  # Flattened to x_vec (n D) as in the paper: one matmul and one fused sum of squares.
  x_BxLxND = x_BxLxNxD.astype(jnp.float32).reshape(*x_BxLxNxD.shape[:-2], -1)
  inv_rms_BxLx1 = jax.lax.rsqrt(mixing.mean_square(x_BxLxND) + eps)
  phi_NDxK = phi_NxDxK.astype(jnp.float32).reshape(x_BxLxND.shape[-1], -1)
  # As a 2-D matmul of the flattened rows (see mixing.normed_projection).
  proj_BxLxK = mixing.project_rows(x_BxLxND.reshape(-1, x_BxLxND.shape[-1]),
                                   phi_NDxK).reshape(*x_BxLxND.shape[:-1], -1)
  return proj_BxLxK * inv_rms_BxLx1


def _bias_init(cfg, mapping: str, sublayer_index) -> jax.Array:
  """The float32 static logits of one mapping at init (see Connection)."""
  n = cfg.n
  if mapping == 'pre' and cfg.pre_init == 'home':
    # jax ops: sublayer_index may be traced (blocks are created under nnx.vmap).
    home_N = jax.nn.one_hot((jnp.asarray(sublayer_index) + cfg.index_base) % n, n,
                            dtype=jnp.bool_)
    off = cfg.pre_off_home
    return jnp.where(home_N, _logit(1.0 - (n - 1) * off), _logit(off)).astype(jnp.float32)
  if mapping == 'pre':
    return jnp.full((n,), _logit(1.0 / n), jnp.float32)
  if mapping == 'post':
    return jnp.full((n,), _logit(1.0 / cfg.post_mult), jnp.float32)
  if cfg.res_init == 'uniform':
    return jnp.zeros((n * n,), jnp.float32)
  eye_NxN = jnp.eye(n, dtype=bool)
  return jnp.where(eye_NxN, 0.0, cfg.res_offdiag_logit).astype(jnp.float32).reshape(n * n)


class Streams(nnx.Module):
  """n residual streams: expand broadcasts h; reduce sums, or with reduce='head' takes
  sum_i w_i x_i with w = sigmoid(gate_head * (x~ phi_head) + bias_head) (TileKernels mhc_head).

  Head parameters: phi_head (n, D, n) HCDynamic zero-init, bias_head (n,) HCStatic = logit(1/n)
  (so the head starts as the mean of the streams), gate_head () HCStatic = gate_init.
  """

  def __init__(self, cfg, *, dim: int, norm_eps: float, rngs: nnx.Rngs):
    del rngs
    n = self.num_streams = cfg.n
    self.eps = norm_eps
    self.head = cfg.reduce == 'head'
    if self.head:
      self.phi_head = params.HCDynamic(jnp.zeros((n, dim, n), jnp.float32),
                                       out_sharding=('streams', 'embed', 'hc'))
      self.bias_head = params.HCStatic(jnp.full((n,), _logit(1.0 / n), jnp.float32),
                                       out_sharding=('streams',))
      self.gate_head = _scalar(cfg.gate_init)

  def expand(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, n, D], a broadcast (no copy)."""
    return jnp.broadcast_to(h_BxLxD[..., None, :],
                            (*h_BxLxD.shape[:-1], self.num_streams, h_BxLxD.shape[-1]))

  def head_weights(self, x_BxLxNxD: jax.Array) -> jax.Array:
    """The float32 head weights w [B, L, n] (reduce='head' only)."""
    proj_BxLxN = _normed_projection(x_BxLxNxD, self.phi_head[...], self.eps)
    return jax.nn.sigmoid(self.gate_head[...] * proj_BxLxN + self.bias_head[...])

  def reduce(self, x_BxLxNxD: jax.Array) -> jax.Array:
    """[B, L, n, D] -> [B, L, D] (accumulated in float32)."""
    if not self.head:
      return jnp.sum(x_BxLxNxD, axis=-2, dtype=jnp.float32).astype(x_BxLxNxD.dtype)
    w_BxLxN = self.head_weights(x_BxLxNxD)
    return jnp.einsum('...n,...nd->...d', w_BxLxN.astype(x_BxLxNxD.dtype), x_BxLxNxD,
                      preferred_element_type=jnp.float32).astype(x_BxLxNxD.dtype)

  def ends(self, x_BxLxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A broadcast in; a sum out, or the head's learned weights."""
    batch, n = x_BxLxNxD.shape[:-2], self.num_streams
    out_extract = (self.head_weights(x_BxLxNxD)[..., None] if self.head
                   else residual.ones(batch, n, 1))
    return residual.ones(batch, 1, n), out_extract


class Connection(nnx.Module):
  """One mHC module around one sub-layer: (x_BxLxNxD, branch) -> x_BxLxNxD.

  Parameters, for the learned mappings only (K = n for pre, n for post, n^2 for res, in that order):
    phi (n, D, K) HCDynamic, zero-init;  bias (K,) HCStatic;  gate_pre/post/res () HCStatic.
  Bias init: pre per cfg.pre_init: 'home' H_pre = 1 - (n-1) pre_off_home on the home stream
  (sublayer_index + index_base) mod n and pre_off_home elsewhere, 'uniform' H_pre = 1/n (see the
  module docstring); post logit(1/post_mult) (H_post = 1); res per cfg.res_init: 'identity' 0 on
  the diagonal and res_offdiag_logit off it, 'uniform' all 0.
  """

  branch_prenorm = True

  def __init__(self, cfg, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
               rngs: nnx.Rngs):
    del norm_kind, rngs
    n = self.num_streams = cfg.n
    self.eps = norm_eps
    self.sinkhorn_iters = cfg.sinkhorn_iters
    self.post_mult = cfg.post_mult
    self.mappings = tuple(name for name in MAPPINGS if name in cfg.mappings)
    if self.mappings:
      bias_K = jnp.concatenate([_bias_init(cfg, name, sublayer_index)
                                for name in self.mappings])
      self.phi = params.HCDynamic(jnp.zeros((n, dim, bias_K.shape[0]), jnp.float32),
                                  out_sharding=('streams', 'embed', 'hc'))
      self.bias = params.HCStatic(bias_K, out_sharding=('hc',))
    for name in MAPPINGS:
      setattr(self, f'gate_{name}', _scalar(cfg.gate_init) if name in self.mappings else None)

  def coefficients(self, x_BxLxNxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns float32 (H_pre [.., n], H_post [.., n], H_res [.., n, n]).

    The leading axes are x's [B, L] when any mapping is learned, else absent (all fixed).
    """
    n = self.num_streams
    batch = x_BxLxNxD.shape[:-2] if self.mappings else ()
    fixed = {'pre': jnp.full((n,), 1.0 / n, jnp.float32),
             'post': jnp.ones((n,), jnp.float32),
             'res': jnp.eye(n, dtype=jnp.float32)}
    coef = {name: jnp.broadcast_to(value, batch + value.shape) for name, value in fixed.items()}
    if self.mappings:
      proj_BxLxK = _normed_projection(x_BxLxNxD, self.phi[...], self.eps)
      sizes = {'pre': n, 'post': n, 'res': n * n}
      gates_K = jnp.concatenate(
          [jnp.broadcast_to(getattr(self, f'gate_{name}')[...], (sizes[name],))
           for name in self.mappings])
      logits_BxLxK = gates_K * proj_BxLxK + self.bias[...]
      start = 0
      for name in self.mappings:
        logits = logits_BxLxK[..., start:start + sizes[name]]
        start += sizes[name]
        if name == 'pre':
          coef['pre'] = jax.nn.sigmoid(logits)
        elif name == 'post':
          coef['post'] = self.post_mult * jax.nn.sigmoid(logits)
        else:
          coef['res'] = sinkhorn(logits.reshape(*batch, n, n), self.sinkhorn_iters)
    return coef['pre'], coef['post'], coef['res']

  def __call__(self, x_BxLxNxD: jax.Array, branch) -> jax.Array:
    h_pre, h_post, h_res = self.coefficients(x_BxLxNxD)
    # coef[i, 0] = H_pre[i], coef[i, 1 + j] = H_res[j, i]: branch input and new residual streams
    # in one contraction.
    coef_NxM = jnp.concatenate([h_pre[..., None], jnp.swapaxes(h_res, -1, -2)], axis=-1)
    mix_BxLxMxD = mixing.mix_streams(coef_NxM, x_BxLxNxD)
    y_BxLxD = branch(mix_BxLxMxD[..., 0, :])
    return mixing.add_branch(h_post, y_BxLxD[..., None, :], mix_BxLxMxD[..., 1:, :])

  def hc_form(self, x_BxLxNxD, h_BxLxD, y_BxLxD):
    """Extract H_pre, residual H_res^T, inject H_post."""
    del h_BxLxD, y_BxLxD
    batch = x_BxLxNxD.shape[:-2]
    h_pre, h_post, h_res = (jnp.broadcast_to(c, batch + c.shape[len(c.shape) - k:])
                            for c, k in zip(self.coefficients(x_BxLxNxD), (1, 1, 2)))
    return ({'extract': h_pre[..., None], 'res': jnp.swapaxes(h_res, -1, -2),
             'inject': h_post[..., None, :]},
            {'H_pre': h_pre, 'H_post': h_post, 'H_res': h_res})


KIND = protocol.Kind(
    name=NAME, defaults=defaults, validate=validate, layout=hc.copies_layout, Streams=Streams,
    Connection=Connection, extra_flops=extra_flops,
    out_proj_multiplier=lambda cfg: checks.out_proj_multiplier(cfg, cfg.n))
