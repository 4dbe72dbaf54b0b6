"""Tests of the hyper-connection family (hyperconn_jax.connections: hc, mhc, frac).

The references below are the papers' equations written plainly in numpy (float64, loops over tokens
and streams); they share no code with the package. Modules are built outside any mesh with eager
sharding off, as a user without a mesh would.
"""

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import base
from hyperconn_jax import connections, params
from hyperconn_jax.connections import mixing
from hyperconn_jax.connections import sinkhorn as sinkhorn_lib

B, L, EPS = 2, 3, 1e-5


# ----------------------------------------------------------------------------------- helpers

make_config = helpers.connection_config
build = helpers.build_connection_modules
randomize = helpers.randomize


def value(module, name):
  """A variable of `module` as float64 numpy, or None if the module has none of that name."""
  variable = getattr(module, name, None)
  return None if variable is None else np.asarray(variable[...], np.float64)


def make_branch(dim, seed=1):
  """A simple nonlinear branch y -> tanh(y W), as a jax function and its numpy twin."""
  w = np.random.default_rng(seed).normal(size=(dim, dim)) / math.sqrt(dim)
  w32 = jnp.asarray(w, jnp.float32)
  return (lambda y: jnp.tanh(y @ w32.astype(y.dtype))), (lambda y: np.tanh(y @ w))


def random_streams(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def count(module):
  """Parameters of a module, frozen coefficients included."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, (nnx.Param, params.HCFrozen))))


# ------------------------------------------------------------------ numpy references (papers)

def ref_norm(v, kind, eps):
  """Norm over the last axis."""
  if kind == 'none':
    return v
  if kind == 'layernorm':
    v = v - v.mean(-1, keepdims=True)
  return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps)


def ref_sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def ref_hc_coefficients(x, module, config):
  """HC Eqs. 10-13 (and FC Eqs. 9-14, the same with fractions): alpha [B,L,N,M], beta [B,L,N]."""
  config = config[config.kind]
  nb, nl, n = x.shape[:3]
  static_alpha, static_beta = value(module, 'static_alpha'), value(module, 'static_beta')
  alpha = np.zeros((nb, nl) + static_alpha.shape)
  beta = np.zeros((nb, nl, n))
  for b in range(nb):
    for t in range(nl):
      for i in range(n):
        alpha[b, t, i] = static_alpha[i]
        beta[b, t, i] = static_beta[i]
        if not config.dynamic:
          continue
        hbar = ref_norm(x[b, t, i], config.dynamic_norm, EPS)
        if config.dynamic_norm_affine:
          hbar = hbar * value(module, 'norm_scale')
        dyn_alpha = hbar @ value(module, 'dynamic_alpha')
        dyn_beta = hbar @ value(module, 'dynamic_beta')
        if config.tanh:
          dyn_alpha, dyn_beta = np.tanh(dyn_alpha), np.tanh(dyn_beta)
        if config.scale:
          dyn_alpha = value(module, 'alpha_scale') * dyn_alpha
          dyn_beta = value(module, 'beta_scale') * dyn_beta
        alpha[b, t, i] += dyn_alpha
        beta[b, t, i] += dyn_beta
  return alpha, beta


def ref_hc(x, module, config, branch):
  """HC Algorithm 2: h_0 = sum_i alpha_i0 h_i, h'_j = sum_i alpha_i(1+j) h_i,
  out_j = beta_j T(h_0) + h'_j."""
  alpha, beta = ref_hc_coefficients(x, module, config)
  nb, nl, n, _ = x.shape
  out = np.zeros_like(x)
  for b in range(nb):
    for t in range(nl):
      h0 = sum(alpha[b, t, i, 0] * x[b, t, i] for i in range(n))
      y = branch(h0)
      for j in range(n):
        out[b, t, j] = beta[b, t, j] * y + sum(alpha[b, t, i, 1 + j] * x[b, t, i] for i in range(n))
  return out


def ref_frac(x, module, config, branch):
  """FC Eq. 8 / Alg. 2-3: T input = concat_k sum_i Y_ik h_i;
  out_j = beta_j T(.)_j + sum_i A_ij h_i."""
  alpha, beta = ref_hc_coefficients(x, module, config)
  nb, nl, m, _ = x.shape
  out = np.zeros_like(x)
  for b in range(nb):
    for t in range(nl):
      fracs = [sum(alpha[b, t, i, k] * x[b, t, i] for i in range(m)) for k in range(m)]
      y = branch(np.concatenate(fracs)).reshape(m, -1)
      for j in range(m):
        out[b, t, j] = beta[b, t, j] * y[j] + sum(alpha[b, t, i, m + j] * x[b, t, i]
                                                   for i in range(m))
  return out


def ref_sinkhorn(logits, iters):
  """mHC Eq. 9 in float64: M0 = exp(logits); M <- T_r(T_c(M)) iters times."""
  m = np.exp(np.asarray(logits, np.float64))
  for _ in range(iters):
    m = m / m.sum(axis=0, keepdims=True)
    m = m / m.sum(axis=1, keepdims=True)
  return m


def ref_mhc_coefficients(x, module, config):
  """mHC Eqs. 7-8 per token: H_pre [B,L,n], H_post [B,L,n], H_res [B,L,n,n] (fixed ones if
  not learned)."""
  config = config.mhc
  nb, nl, n, d = x.shape
  learned = [name for name in ('pre', 'post', 'res') if name in config.mappings]
  sizes = {'pre': n, 'post': n, 'res': n * n}
  pre = np.full((nb, nl, n), 1.0 / n)
  post = np.ones((nb, nl, n))
  res = np.broadcast_to(np.eye(n), (nb, nl, n, n)).copy()
  if not learned:
    return pre, post, res
  phi = value(module, 'phi').reshape(n * d, -1)  # vec(x) is stream-major: index i * D + d.
  bias = value(module, 'bias')
  gates = np.concatenate([np.full(sizes[name], value(module, f'gate_{name}')) for name in learned])
  for b in range(nb):
    for t in range(nl):
      xv = x[b, t].reshape(n * d)
      xt = xv / np.sqrt(np.mean(xv * xv) + EPS)
      logits = gates * (xt @ phi) + bias
      start = 0
      for name in learned:
        part = logits[start:start + sizes[name]]
        start += sizes[name]
        if name == 'pre':
          pre[b, t] = ref_sigmoid(part)
        elif name == 'post':
          post[b, t] = config.post_mult * ref_sigmoid(part)
        else:
          res[b, t] = ref_sinkhorn(part.reshape(n, n), config.sinkhorn_iters)
  return pre, post, res


def ref_mhc(x, module, config, branch):
  """mHC Eq. 3: out_j = sum_i H_res[j, i] x_i + H_post[j] F(sum_i H_pre[i] x_i)."""
  pre, post, res = ref_mhc_coefficients(x, module, config)
  nb, nl, n, _ = x.shape
  out = np.zeros_like(x)
  for b in range(nb):
    for t in range(nl):
      y = branch(sum(pre[b, t, i] * x[b, t, i] for i in range(n)))
      for j in range(n):
        out[b, t, j] = sum(res[b, t, j, i] * x[b, t, i] for i in range(n)) + post[b, t, j] * y
  return out


def ref_mhc_head(x, streams):
  """TileKernels mhc_head: w = sigmoid(gate * (x~ phi_head) + bias); out = sum_i w_i x_i."""
  nb, nl, n, d = x.shape
  phi = value(streams, 'phi_head').reshape(n * d, n)
  out = np.zeros((nb, nl, d))
  for b in range(nb):
    for t in range(nl):
      xv = x[b, t].reshape(n * d)
      xt = xv / np.sqrt(np.mean(xv * xv) + EPS)
      w = ref_sigmoid(value(streams, 'gate_head') * (xt @ phi) + value(streams, 'bias_head'))
      out[b, t] = sum(w[i] * x[b, t, i] for i in range(n))
  return out


def ref_altup(x, p, g, active, branch_np):
  """AltUp (arXiv 2301.13310) Algorithm 1 around one sub-layer T with residual: predict
  xhat = P x, compute xtilde = xhat_j* + T(xhat_j*), correct out_i = xhat_i + g_i (xtilde -
  xhat_j*)."""
  xhat = np.einsum('ij,bljd->blid', p, x)
  xtilde = xhat[:, :, active] + branch_np(xhat[:, :, active])
  return xhat + g[:, None] * (xtilde - xhat[:, :, active])[:, :, None, :]


def ref_resi_dual(h, branches_np, dual_scale):
  """ResiDual (arXiv 2304.14802; microsoft/ResiDual): x_a = x_d = h; per sub-layer y = T(x_a),
  x_d += y, x_a = LN(x_a + y); output x_a + LN(x_d) * dual_scale."""
  x_a, x_d = h, h
  for branch_np in branches_np:
    y = branch_np(x_a)
    x_d = x_d + y
    x_a = ref_norm(x_a + y, 'layernorm', EPS)
  return x_a + ref_norm(x_d, 'layernorm', EPS) * dual_scale


@pytest.mark.parametrize('k,sublayer,index_base', [(2, 0, 0), (2, 3, 0), (3, 4, 1), (1, 2, 0)])
def test_altup_matches_reference(k, sublayer, index_base):
  d = 8
  config = make_config('altup', n=k, index_base=index_base)
  _, connection = build(config, d, sublayer_index=sublayer)
  rng = np.random.default_rng(k)
  p, g = rng.normal(size=(k, k)), rng.normal(size=(k,))
  connection.predict[...] = jnp.asarray(p, jnp.float32)
  connection.correct[...] = jnp.asarray(g, jnp.float32)
  branch, branch_np = make_branch(d)
  x = random_streams((B, L, k, d))
  want = ref_altup(np.asarray(x, np.float64), p, g, (sublayer + index_base) % k, branch_np)
  np.testing.assert_allclose(connection(x, branch), want, rtol=1e-5, atol=1e-5)


def test_resi_dual_matches_reference():
  d = 8
  config = make_config('resi_dual')
  streams, _ = build(config, d)
  modules = [build(config, d, sublayer_index=k)[1] for k in range(3)]
  assert not modules[0].branch_prenorm
  scale = np.random.default_rng(0).normal(size=d)
  streams.dual_norm.scale[...] = jnp.asarray(scale, jnp.float32)
  pairs = [make_branch(d, seed=s) for s in range(3)]
  h = random_streams((B, L, d))
  x = streams.expand(h)
  for module, (branch, _) in zip(modules, pairs):
    x = module(x, branch)
  want = ref_resi_dual(np.asarray(h, np.float64), [b for _, b in pairs], dual_scale=scale)
  np.testing.assert_allclose(streams.reduce(x), want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- module vs reference (random)

def assert_matches_reference(config, ref, x, *, seed, dim=None, sublayer_index=0):
  """A connection with random variables, applied to streams x with a nonlinear branch, equals
  ref(x, connection, config, branch_np) (a numpy transcription of the paper's equations)."""
  dim = dim or x.shape[-1]
  _, connection = build(config, dim, sublayer_index=sublayer_index)
  randomize(connection, seed=seed)
  branch, branch_np = make_branch(dim)
  want = ref(np.asarray(x, np.float64), connection, config, branch_np)
  np.testing.assert_allclose(connection(x, branch), want, rtol=1e-5, atol=1e-5)


HC_VARIANTS = {
    'static': dict(dynamic=False, tanh=False),
    'dynamic_layernorm': dict(),
    'dynamic_rmsnorm_affine': dict(dynamic_norm='rmsnorm', dynamic_norm_affine=True),
    'dynamic_layernorm_affine_no_tanh': dict(dynamic_norm_affine=True, tanh=False),
    'dynamic_no_norm_no_tanh': dict(dynamic_norm='none', tanh=False),
    'dynamic_no_scale': dict(scale=False),
    'dynamic_rmsnorm_no_scale_no_tanh': dict(dynamic_norm='rmsnorm', scale=False, tanh=False),
}


@pytest.mark.parametrize('variant', sorted(HC_VARIANTS))
@pytest.mark.parametrize('n', [1, 3, 4])
def test_hc_matches_reference(variant, n):
  config = make_config('hc', n=n, **HC_VARIANTS[variant])
  assert_matches_reference(config, ref_hc, random_streams((B, L, n, 8)), seed=n, sublayer_index=5)


@pytest.mark.parametrize('variant', sorted(HC_VARIANTS))
@pytest.mark.parametrize('m', [1, 2, 4])
def test_frac_matches_reference(variant, m):
  config = make_config('frac', m=m, **HC_VARIANTS[variant])
  d = 16
  streams, _ = build(config, d)
  x = streams.expand(random_streams((B, L, d)))
  assert x.shape == (B, L, m, d // m)
  assert_matches_reference(config, ref_frac, x, seed=m, dim=d)


MHC_VARIANTS = {
    'all': dict(),
    'all_uniform_post3': dict(res_init='uniform', post_mult=3.0, sinkhorn_iters=7),
    'res_only': dict(mappings=('res',)),
    'pre_post': dict(mappings=('post', 'pre')),
    'none': dict(mappings=()),
}


@pytest.mark.parametrize('variant', sorted(MHC_VARIANTS))
@pytest.mark.parametrize('n', [2, 4])
def test_mhc_matches_reference(variant, n):
  config = make_config('mhc', n=n, **MHC_VARIANTS[variant])
  assert_matches_reference(config, ref_mhc, random_streams((B, L, n, 8)), seed=n)


def test_mhc_head_reduce_matches_reference():
  config = make_config('mhc', n=3, reduce='head')
  streams, _ = build(config, 8)
  randomize(streams, seed=3)
  x = random_streams((B, L, 3, 8))
  np.testing.assert_allclose(streams.reduce(x), ref_mhc_head(np.asarray(x, np.float64), streams),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------- hand-written gradients of mixing.py


def _jnp_norm(x, kind):
  if kind == 'layernorm':
    x = x - jnp.mean(x, -1, keepdims=True)
  if kind == 'none':
    return x
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + EPS)


def _assert_same_vjp(fn, ref, args, seed=7):
  @jax.jit  # One compile rather than one per eager op.
  def outputs_and_gradients(args):
    out, fn_vjp = jax.vjp(fn, *args)
    want_out, ref_vjp = jax.vjp(ref, *args)
    cotangent = jax.random.normal(jax.random.key(seed), out.shape)
    return (out, *fn_vjp(cotangent)), (want_out, *ref_vjp(cotangent))
  for got, want in zip(*outputs_and_gradients(args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind,k', [  # Narrow: a multiply-reduce weight gradient; wide: matmul.
    ('layernorm', 3), ('rmsnorm', 3), ('none', 3), ('layernorm', mixing.NARROW_K + 1)])
def test_normed_projection_matches_autodiff_of_the_plain_formula(kind, k):
  x = 2.0 * random_streams((B, L, 2, 16)) + 0.5
  w = jax.random.normal(jax.random.key(1), (16, k))
  _assert_same_vjp(lambda x, w: mixing.normed_projection(x, w, kind, EPS),
                   lambda x, w: jnp.einsum('...w,wk->...k', _jnp_norm(x, kind), w,
                                           precision=jax.lax.Precision.HIGHEST), (x, w))


@pytest.mark.parametrize('per_token', [False, True])
def test_mix_and_add_branch_match_autodiff_of_the_plain_formula(per_token):
  x = random_streams((B, L, 3, 8))
  coef = jax.random.normal(jax.random.key(1), ((B, L) if per_token else ()) + (3, 4))
  beta = jax.random.normal(jax.random.key(2), ((B, L) if per_token else ()) + (3,))
  y = random_streams((B, L, 1, 8), seed=3)
  _assert_same_vjp(mixing.mix_streams, lambda c, x: jnp.einsum('...nm,...nd->...md', c, x),
                   (coef, x))
  _assert_same_vjp(mixing.add_branch, lambda b, y, r: b[..., None] * y + r, (beta, y, x))
  y_per_stream = random_streams((B, L, 3, 8), seed=4)  # Frac-Connections' form.
  _assert_same_vjp(mixing.add_branch, lambda b, y, r: b[..., None] * y + r,
                   (beta, y_per_stream, x))


# ---------------------------------------------------------------- width mixing is applied

PERM = np.array([1, 2, 3, 0])  # A 4-cycle: not its own inverse, so a transpose is caught.


def permutation_matrix(perm):
  """P[i, perm[i]] = 1: with out_j = sum_i P[i, j] x_i, stream i moves to perm[i]."""
  p = np.zeros((len(perm), len(perm)))
  p[np.arange(len(perm)), perm] = 1.0
  return p


def expected_permuted(x):
  want = np.zeros_like(np.asarray(x))
  want[..., PERM, :] = np.asarray(x)
  return want


def test_hc_residual_matrix_permutes_streams():
  # lucidrains bug #8: A_r was computed but the unmixed input was returned.
  config = make_config('hc', n=4, dynamic=False, tanh=False)
  _, connection = build(config, 8)
  static_alpha = np.asarray(connection.static_alpha[...]).copy()
  static_alpha[:, 1:] = permutation_matrix(PERM)
  connection.static_alpha[...] = jnp.asarray(static_alpha)
  connection.static_beta[...] = jnp.zeros(4)
  x = random_streams((B, L, 4, 8))
  out = connection(x, make_branch(8)[0])
  np.testing.assert_array_equal(out, expected_permuted(x))


def test_frac_residual_matrix_permutes_fractions():
  config = make_config('frac', m=4, dynamic=False, tanh=False)
  _, connection = build(config, 16)
  connection.static_alpha[...] = jnp.asarray(
      np.concatenate([np.eye(4), permutation_matrix(PERM)], axis=1))
  connection.static_beta[...] = jnp.zeros(4)
  x = random_streams((B, L, 4, 4))
  out = connection(x, make_branch(16)[0])
  np.testing.assert_array_equal(out, expected_permuted(x))


def test_mhc_residual_matrix_orientation():
  # H_res logits 0 on P^T (entry [j, i] for x_i -> stream j) and -40 elsewhere: H_res ~ P^T (up to
  # e^-40), so out_j = sum_i H_res[j, i] x_i moves stream i to perm[i]; H_post ~ 0 removes
  # the branch. The transposed orientation would be off by O(1).
  config = make_config('mhc', n=4, mappings=('post', 'res'))
  _, connection = build(config, 8)
  res_logits = np.where(permutation_matrix(PERM).T > 0, 0.0, -40.0).reshape(16)
  connection.bias[...] = jnp.asarray(np.concatenate([np.full(4, -40.0), res_logits]), jnp.float32)
  x = random_streams((B, L, 4, 8))
  out = connection(x, make_branch(8)[0])
  np.testing.assert_allclose(out, expected_permuted(x), atol=1e-4)


# ----------------------------------------------------------------------------------- Sinkhorn

def ref_sinkhorn_batch(logits, iters=20):
  return np.stack([ref_sinkhorn(l, iters) for l in np.asarray(logits, np.float64)])


@pytest.mark.parametrize('n', [2, 4, 8])
@pytest.mark.parametrize('std', [1.0, 2.0, 4.0, 8.0])
def test_sinkhorn_matches_eq9(std, n):
  logits = random_streams((64, n, n), seed=n) * std
  m = np.asarray(sinkhorn_lib.sinkhorn(logits, 20))
  want = ref_sinkhorn_batch(logits)
  assert m.dtype == np.float32
  np.testing.assert_allclose(m, want, rtol=0, atol=2e-6)
  # The last step normalises rows; columns are as balanced as 20 iterations make them.
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=2e-6)
  np.testing.assert_allclose(m.sum(-2), want.sum(-2), atol=1e-5)


@pytest.mark.parametrize('axis', [-1, -2])
@pytest.mark.parametrize('shift', [30.0, -30.0])
def test_sinkhorn_with_one_row_or_column_shifted(axis, shift):
  logits = np.asarray(random_streams((64, 4, 4), seed=3)) * 2.0
  shifted = logits.copy()
  # axis=-1: the last column of every matrix (T_c removes it: Eq. 9 does not change at all);
  # axis=-2: the last row (Eq. 9 changes only by 20 iterations' imbalance; compare with it).
  if axis == -1:
    shifted[..., :, -1] += shift
  else:
    shifted[..., -1, :] += shift
  m = np.asarray(sinkhorn_lib.sinkhorn(jnp.asarray(shifted), 20))
  np.testing.assert_allclose(m, ref_sinkhorn_batch(shifted), rtol=0, atol=2e-6)
  if axis == -1:
    np.testing.assert_allclose(m, sinkhorn_lib.sinkhorn(jnp.asarray(logits), 20), atol=1e-6)


def test_sinkhorn_gradient_matches_finite_differences_of_eq9():
  logits = np.asarray(random_streams((4, 4, 4), seed=4), np.float64) * 3.0
  weights = np.asarray(random_streams((4, 4, 4), seed=5), np.float64)
  got = jax.grad(lambda l: jnp.sum(sinkhorn_lib.sinkhorn(l, 20) * weights))(
      jnp.asarray(logits, jnp.float32))
  want = np.zeros_like(logits)
  h = 1e-6
  for index in np.ndindex(*logits.shape):
    step = np.zeros_like(logits)
    step[index] = h
    want[index] = np.sum((ref_sinkhorn_batch(logits + step) - ref_sinkhorn_batch(logits - step))
                         * weights) / (2 * h)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_sinkhorn_extreme_logits():
  # Spreads of hundreds of nats, far past float32's exp range: every row and column still has mass,
  # nothing is NaN, and Eq. 9 in float64 agrees.
  logits = random_streams((64, 4, 4), seed=2) * 30.0
  m = np.asarray(sinkhorn_lib.sinkhorn(logits, 20))
  assert np.isfinite(m).all() and (m >= 0).all()
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=2e-6)
  np.testing.assert_allclose(m, ref_sinkhorn_batch(logits), rtol=0, atol=1e-5)
  # A shift of all logits by 1000 changes nothing (exp(1000) overflows float32 and float64 alike);
  # the tolerance is float32's rounding of logits near 1000.
  np.testing.assert_allclose(sinkhorn_lib.sinkhorn(logits / 30.0 + 1000.0, 20),
                             sinkhorn_lib.sinkhorn(logits / 30.0, 20), atol=1e-4)
  # A row 200 nats below the rest: in float32, exp of it underflows against the other rows. The
  # tolerance is float32's rounding of logits near -200.
  low = np.asarray(logits) / 30.0
  low[:, 0, :] -= 200.0
  m = np.asarray(sinkhorn_lib.sinkhorn(jnp.asarray(low), 20))
  np.testing.assert_allclose(m, ref_sinkhorn_batch(low), rtol=0, atol=1e-5)


def test_mhc_coefficient_ranges_on_random_inputs():
  config = make_config('mhc', n=4)
  _, connection = build(config, 8)
  randomize(connection, seed=7, scale=2.0)
  h_pre, h_post, h_res = connection.coefficients(random_streams((B, L, 4, 8), seed=3) * 3.0)
  assert h_pre.dtype == h_post.dtype == h_res.dtype == jnp.float32
  assert h_pre.shape == h_post.shape == (B, L, 4) and h_res.shape == (B, L, 4, 4)
  assert float(h_pre.min()) > 0 and float(h_pre.max()) < 1
  assert float(h_post.min()) > 0 and float(h_post.max()) < 2
  assert float(h_res.min()) >= 0
  np.testing.assert_allclose(h_res.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('n', [2, 4])
def test_mhc_res_init(n):
  x = random_streams((B, L, n, 8))
  _, identity = build(make_config('mhc', n=n), 8)
  _, _, h_res = identity.coefficients(x)
  assert float(jnp.diagonal(h_res, axis1=-2, axis2=-1).min()) > 0.9
  _, uniform = build(make_config('mhc', n=n, res_init='uniform', pre_init='uniform'), 8)
  h_pre, h_post, h_res = uniform.coefficients(x)
  np.testing.assert_allclose(h_res, 1.0 / n, atol=1e-6)
  np.testing.assert_allclose(h_pre, 1.0 / n, atol=1e-6)
  np.testing.assert_allclose(h_post, 1.0, atol=1e-6)


def test_mhc_home_pre_init_from_traced_sublayer_index():
  config = make_config('mhc', n=4, index_base=1, pre_off_home=0.02)

  @nnx.vmap(in_axes=0, out_axes=0)
  def create(k):
    return connections.build_connection(config, dim=8, sublayer_index=k, norm_kind='layernorm',
                                        norm_eps=EPS, rngs=nnx.Rngs(0))

  ks = np.array([0, 1, 2, 5])
  with nnx.use_eager_sharding(False):
    stacked = create(jnp.asarray(ks))
  h_pre = jax.nn.sigmoid(np.asarray(stacked.bias[...])[:, :4])
  want = np.where(np.eye(4, dtype=bool)[(ks + 1) % 4], 1 - 3 * 0.02, 0.02)
  np.testing.assert_allclose(h_pre, want, rtol=1e-5)
  np.testing.assert_allclose(h_pre.sum(-1), 1.0, rtol=1e-6)  # So init still equals Pre-Norm.


@pytest.mark.parametrize('pre_init', ['uniform', 'home'])
def test_mhc_streams_separate_in_training_only_with_home_pre_init(pre_init):
  """mhc.py's docstring: with H_pre = 1/n the replicated streams get equal gradients and stay
  equal (so H_res never learns); a home-stream H_pre lets them separate and H_res learn."""
  n, d = 4, 8
  config = make_config('mhc', n=n, pre_init=pre_init)
  streams, _ = build(config, d)
  modules = [build(config, d, sublayer_index=k)[1] for k in range(3)]
  branches = [make_branch(d, seed=s)[0] for s in range(3)]
  h, target = random_streams((B, L, d), seed=1), random_streams((B, L, d), seed=2)
  res_bias_init = [np.asarray(m.bias[...])[2 * n:] for m in modules]

  def run(*modules):
    x = streams.expand(h)
    for module, branch in zip(modules, branches):
      x = module(x, branch)
    return x

  loss = lambda *modules: jnp.mean((streams.reduce(run(*modules)) - target) ** 2)  # noqa: E731
  for _ in range(5):  # Plain SGD.
    grads = nnx.grad(loss, argnums=(0, 1, 2))(*modules)
    for module, grad in zip(modules, grads):
      nnx.update(module, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(module, nnx.Param),
                                      nnx.state(grad, nnx.Param)))
  x = np.asarray(run(*modules))
  spread = np.abs(x - x[..., :1, :]).max() / np.abs(x).max()
  res_moved = max(np.abs(np.asarray(m.bias[...])[2 * n:] - b).max()
                  for m, b in zip(modules, res_bias_init))
  if pre_init == 'uniform':
    assert spread < 1e-5 and res_moved < 1e-6, (spread, res_moved)  # Rounding only.
  else:
    assert spread > 1e-3 and res_moved > 1e-4, (spread, res_moved)


# ------------------------------------------------------------------------ init = Pre-Norm

INIT_CASES = [
    ('hc', dict(n=1, dynamic=False, tanh=False), 1),
    ('hc', dict(n=4, dynamic=False, tanh=False), 4),
    ('hc', dict(n=4), 4),
    ('hc', dict(n=2, index_base=1, dynamic_norm='rmsnorm', dynamic_norm_affine=True), 2),
    ('hc', dict(n=3, tanh=False, scale=False), 3),
    ('mhc', dict(n=4), 4),
    ('mhc', dict(n=2, res_init='uniform', pre_init='uniform'), 2),
    ('mhc', dict(n=3, index_base=2, pre_off_home=0.2), 3),
    ('mhc', dict(n=4, reduce='head'), 1),
    ('mhc', dict(n=4, mappings=('res',)), 4),
    ('frac', dict(m=1), 1),
    ('frac', dict(m=4, dynamic=False, tanh=False), 1),
    ('frac', dict(m=4, dynamic_norm='rmsnorm', dynamic_norm_affine=True), 1),
    ('altup', dict(n=2), 2),
    ('altup', dict(n=3, index_base=1), 3),
]


@pytest.mark.parametrize('kind,overrides,factor', INIT_CASES)
def test_init_equals_prenorm_residual(kind, overrides, factor):
  """Three stacked sub-layers at init give factor * Pre-Norm (h + T1(h); + T2; + T3) after reduce.

  hc / mhc with sum reduce: every stream carries x + T(x), so the sum is n times Pre-Norm; frac and
  the mHC head (weights 1/n) give Pre-Norm itself.
  """
  d = 16
  config = make_config(kind, **overrides)
  branches = [make_branch(d, seed=s)[0] for s in range(3)]
  streams, _ = build(config, d)
  modules = [build(config, d, sublayer_index=k)[1] for k in range(3)]
  h = random_streams((B, L, d))
  x = streams.expand(h)
  want = h
  for module, branch in zip(modules, branches):
    x = module(x, branch)
    want = want + branch(want)
  np.testing.assert_allclose(streams.reduce(x), factor * want, rtol=1e-5, atol=1e-5)


def test_hc_home_stream_from_traced_sublayer_index():
  config = make_config('hc', n=4, index_base=1)

  @nnx.vmap(in_axes=0, out_axes=0)
  def create(k):
    return connections.build_connection(config, dim=8, sublayer_index=k, norm_kind='layernorm',
                                        norm_eps=EPS, rngs=nnx.Rngs(0))

  ks = np.array([0, 1, 2, 3, 6, 7])
  with nnx.use_eager_sharding(False):
    stacked = create(jnp.asarray(ks))
  static_alpha = np.asarray(stacked.static_alpha[...])
  np.testing.assert_array_equal(static_alpha[:, :, 0], np.eye(4)[(ks + 1) % 4])
  np.testing.assert_array_equal(static_alpha[:, :, 1:], np.broadcast_to(np.eye(4), (6, 4, 4)))
  np.testing.assert_array_equal(stacked.static_beta[...], np.ones((6, 4)))


def test_streams_expand_is_a_broadcast_and_reduce_inverts():
  h = random_streams((B, L, 16))
  for kind, overrides, factor in (('hc', dict(n=4), 4), ('mhc', dict(n=3), 3),
                                  ('mhc', dict(n=3, reduce='head'), 1), ('frac', dict(m=4), 1)):
    streams, _ = build(make_config(kind, **overrides), 16)
    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(streams.expand)(h).jaxpr.eqns}
    assert primitives <= {'broadcast_in_dim', 'reshape'}, (kind, primitives)
    np.testing.assert_allclose(streams.reduce(streams.expand(h)), factor * h, rtol=1e-6)


# ---------------------------------------------------------------------------------- gradients

GRAD_CASES = {
    'hc_static': ('hc', dict(dynamic=False, tanh=False)),
    'hc_dynamic': ('hc', dict()),
    'hc_dynamic_affine_no_tanh': ('hc', dict(dynamic_norm='rmsnorm', dynamic_norm_affine=True,
                                             tanh=False)),
    'hc_dynamic_no_scale': ('hc', dict(scale=False)),
    'frac_static': ('frac', dict(dynamic=False, tanh=False)),
    'frac_dynamic': ('frac', dict()),
    'frac_dynamic_affine': ('frac', dict(dynamic_norm_affine=True)),
    'mhc': ('mhc', dict(reduce='head')),
    'mhc_uniform_res_only': ('mhc', dict(res_init='uniform', mappings=('res',))),
    'altup': ('altup', dict()),
}

# Parameters whose gradient is exactly 0 at init, whatever the input and cotangent:
# - the scalar scales s_alpha, s_beta (HC Eqs. 11-13) enter as s * tanh(Hbar W); W = 0 at init, so
#   dL/ds = sum dL/dcoef * tanh(0) = 0. Likewise the mHC gates (mHC Eq. 7): dL/da = sum dL/dlogit *
#   (x~ phi) and phi = 0; and the mHC head's gate.
# - the affine scale g of the dynamic norm enters only through (Hbar * g) W with W = 0:
#   dL/dg = Hbar * (W dL/dproj) = 0.
ZERO_AT_INIT = ('alpha_scale', 'beta_scale', 'gate_pre', 'gate_post', 'gate_res', 'gate_head',
                'norm_scale')


def grads_at_init(kind, overrides, x, seed=5):
  d = x.shape[2] * x.shape[3] if kind == 'frac' else x.shape[3]
  config = make_config(kind, **overrides)
  streams, connection = build(config, d, sublayer_index=1)
  branch = make_branch(d)[0]
  rng = np.random.default_rng(seed)
  cot_out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_reduced = jnp.asarray(rng.normal(size=x.shape[:2] + (d,)), jnp.float32)

  def loss(connection, streams):
    out = connection(x, branch)
    return jnp.sum(cot_out * out) + jnp.sum(cot_reduced * streams.reduce(out))

  grads = nnx.grad(loss, argnums=(0, 1))(connection, streams)
  return [dict(nnx.to_flat_state(g)) for g in grads]


@pytest.mark.parametrize('case', sorted(GRAD_CASES))
def test_gradients_reach_every_parameter_at_init(case):
  kind, overrides = GRAD_CASES[case]
  shape = (B, L, 4, 4) if kind == 'frac' else (B, L, 4, 8)
  x = random_streams(shape, seed=11)  # Non-identical streams.
  names = set()
  for grads in grads_at_init(kind, overrides, x):
    for path, grad in grads.items():
      name = path[-1]
      names.add(name)
      g = np.asarray(grad[...])
      assert np.isfinite(g).all(), name
      if name in ZERO_AT_INIT:
        np.testing.assert_array_equal(g, 0.0, err_msg=name)
      else:
        assert (g != 0).all(), (name, g)
  expected = {'hc': {'static_alpha', 'static_beta'}, 'frac': {'static_alpha', 'static_beta'},
              'mhc': {'phi', 'bias', 'gate_res'}, 'altup': {'predict', 'correct'}}[kind]
  if kind in ('hc', 'frac') and overrides.get('dynamic', True):
    expected |= {'dynamic_alpha', 'dynamic_beta'}
  assert expected <= names


def test_mhc_res_gradient_vanishes_with_identical_streams():
  """With x_i = x for all i, out_j = (sum_i H_res[j, i]) x + ...; dL/dH_res[j, i] = <g_j, x> is the
  same for every i (row-constant). The last Sinkhorn step divides each row by its sum, so rows sum
  to exactly 1 whatever the logits: a row-constant cotangent c_j gives sum_i c_j dH_res[j, i] =
  c_j d(1) = 0. So the H_res bias and H_res columns of phi get no gradient; H_pre, H_post do."""
  n, d = 4, 8
  x = jnp.broadcast_to(random_streams((B, L, 1, d), seed=3), (B, L, n, d))
  conn_grads, _ = grads_at_init('mhc', dict(n=n), x)
  bias, phi = np.asarray(conn_grads[('bias',)][...]), np.asarray(conn_grads[('phi',)][...])
  scale = np.abs(bias[:2 * n]).max()
  assert (bias[:2 * n] != 0).all() and (phi[..., :2 * n] != 0).all()
  assert np.abs(bias[2 * n:]).max() < 1e-6 * scale
  assert np.abs(phi[..., 2 * n:]).max() < 1e-6 * np.abs(phi[..., :2 * n]).max()


@pytest.mark.parametrize('kind,extra', [('hc', dict(n=4)), ('frac', dict(m=4))])
@pytest.mark.parametrize('frozen', ['train_width', 'train_beta'])
def test_frozen_ablations_get_no_gradient(kind, extra, frozen):
  width = {'static_alpha', 'dynamic_alpha', 'alpha_scale'}
  beta = {'static_beta', 'dynamic_beta', 'beta_scale'}
  frozen_names = width if frozen == 'train_width' else beta
  config = make_config(kind, **extra, **{frozen: False})
  _, connection = build(config, 16)
  for name in width | beta:
    variable = getattr(connection, name)
    if name in frozen_names:
      assert isinstance(variable, params.HCFrozen) and not isinstance(variable, nnx.Param), name
    else:
      assert isinstance(variable, (params.HCStatic, params.HCDynamic)), name
  shape = (B, L, 4, 4) if kind == 'frac' else (B, L, 4, 16)
  x = random_streams(shape, seed=2)
  branch = make_branch(16)[0]
  grads = nnx.grad(lambda c: jnp.sum(c(x, branch) ** 2))(connection)
  names = {path[-1] for path, _ in nnx.to_flat_state(grads)}
  assert names == (width | beta) - frozen_names
  # Frozen coefficients still act in the forward pass (same output as the trainable module).
  _, trainable = build(make_config(kind, **extra), 16)
  np.testing.assert_allclose(connection(x, branch), trainable(x, branch), rtol=1e-6)


# ---------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize('n', [1, 2, 4, 8])
@pytest.mark.parametrize('d', [8, 16, 2048])
def test_hc_parameter_counts(n, d):
  assert count(build(make_config('hc', n=n, dynamic=False, tanh=False), d)[1]) == n * (n + 2)
  dhc = d * (n + 2) + n * (n + 2) + 2
  assert count(build(make_config('hc', n=n), d)[1]) == dhc
  assert count(build(make_config('hc', n=n, dynamic_norm_affine=True), d)[1]) == d + dhc
  assert count(build(make_config('hc', n=n, train_width=False, train_beta=False), d)[1]) == dhc
  assert count(build(make_config('hc', n=n), d)[0]) == 0


@pytest.mark.parametrize('m', [1, 2, 4])
@pytest.mark.parametrize('d', [8, 16, 2048])
def test_frac_parameter_counts(m, d):
  assert count(build(make_config('frac', m=m, dynamic=False, tanh=False), d)[1]) == m * (2 * m + 1)
  dfc = (d // m) * (2 * m + 1) + m * (2 * m + 1) + 2
  assert count(build(make_config('frac', m=m), d)[1]) == dfc
  assert count(build(make_config('frac', m=m, dynamic_norm='rmsnorm', dynamic_norm_affine=True),
                     d)[1]) == d // m + dfc


def test_olmo_1b_parameter_counts():
  """HC Eq. 25: OLMo-1B-DHCx4 has 394,048 HC parameters over 32 modules; FC Eq. 19: DFCx4 with
  RMSNorm (|theta_norm| = d/m) has 165,056."""
  dhc = count(build(make_config('hc', n=4), 2048)[1])
  dfc = count(build(make_config('frac', m=4, dynamic_norm='rmsnorm', dynamic_norm_affine=True),
                    2048)[1])
  assert (dhc, dhc * 32) == (12_314, 394_048)
  assert (dfc, dfc * 32) == (5_158, 165_056)


@pytest.mark.parametrize('n', [2, 4])
def test_mhc_parameter_counts(n):
  d = 16
  k = n * n + 2 * n
  assert count(build(make_config('mhc', n=n), d)[1]) == n * d * k + k + 3
  assert count(build(make_config('mhc', n=n, mappings=('res',)), d)[1]) == n * d * n * n + n * n + 1
  assert count(build(make_config('mhc', n=n, mappings=()), d)[1]) == 0
  assert count(build(make_config('mhc', n=n), d)[0]) == 0
  assert count(build(make_config('mhc', n=n, reduce='head'), d)[0]) == n * d * n + n + 1


def test_parameter_logical_axes():
  _, connection = build(make_config('hc', n=4, dynamic_norm_affine=True), 8)
  axes = {path[-1]: v.get_metadata()['out_sharding']
          for path, v in nnx.to_flat_state(nnx.state(connection, nnx.Variable))}
  assert axes == {'static_alpha': ('streams', 'hc'), 'static_beta': ('streams',),
                  'dynamic_alpha': ('embed', 'hc'), 'dynamic_beta': ('embed',),
                  'alpha_scale': (), 'beta_scale': (), 'norm_scale': ('embed',)}
  _, connection = build(make_config('mhc', n=4), 8)
  assert connection.phi.get_metadata()['out_sharding'] == ('streams', 'embed', 'hc')


def test_connections_build_under_a_mesh_with_rules():
  rules = base.get_config().mesh.rules
  mesh = jax.make_mesh((1, 8, 1), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    for kind, overrides in (('hc', dict(dynamic_norm_affine=True)), ('mhc', dict(reduce='head')),
                            ('frac', dict(dynamic_norm_affine=True)), ('vwn', {})):
      config = make_config(kind, **overrides)
      connections.build_streams(config, dim=32, norm_eps=EPS, rngs=nnx.Rngs(0))
      connection = connections.build_connection(config, dim=32, sublayer_index=0,
                                                norm_kind='layernorm', norm_eps=EPS,
                                                rngs=nnx.Rngs(0))
      assert connection.branch_prenorm


# ---------------------------------------------------------------------------------- validation

BAD_OPTIONS = [
    ('hc', 'n', 0), ('hc', 'n', 2.0), ('hc', 'n', True), ('mhc', 'n', -1),
    ('frac', 'm', 0), ('frac', 'm', 3), ('frac', 'm', 1.5),
    ('hc', 'dynamic_norm', 'batchnorm'), ('frac', 'dynamic_norm', 'groupnorm'),
    ('hc', 'index_base', -1), ('hc', 'index_base', 0.5),
    ('mhc', 'sinkhorn_iters', 0),
    ('mhc', 'post_mult', 1.0), ('mhc', 'post_mult', 0.5),
    ('mhc', 'res_init', 'eye'), ('mhc', 'reduce', 'mean'),
    ('mhc', 'mappings', ('pre', 'resid')), ('mhc', 'mappings', 'pre'),
    ('hc', 'out_proj_sqrt_n', 'sqrt'), ('mhc', 'out_proj_sqrt_n', 'up'),
    ('hc', 'dynamic_norm_affine', True),  # With dynamic_norm='none' (set below).
    ('altup', 'n', 0), ('altup', 'index_base', -2),
    ('vwn', 'm', 0), ('vwn', 'm', 3), ('vwn', 'n', 1), ('vwn', 'dynamic', 1),
    ('vwn', 'reduce_norm', 'layer'), ('vwn', 'reduce_init', 'zeros'),
]


@pytest.mark.parametrize('kind,field,bad', BAD_OPTIONS)
def test_validate_names_field_and_value(kind, field, bad):
  # A plain namespace: ConfigDict itself refuses some of these types before validate sees them.
  options = types.SimpleNamespace(**make_config(kind)[kind].to_dict())
  config = types.SimpleNamespace(kind=kind, **{kind: options})
  setattr(options, field, bad)
  if field == 'dynamic_norm_affine':
    options.dynamic_norm = 'none'
  with pytest.raises(ValueError, match=f'model\\.connection\\.{kind}\\.{field} ') as err:
    connections.validate(config, 16)
  assert repr(bad) in str(err.value)


def test_validate_special_cases():
  config = base.connection_config()
  config.kind = 'dense'
  with pytest.raises(ValueError, match=r"model\.connection\.kind .*'dense'"):
    connections.validate(config, 16)
  with pytest.raises(ValueError, match=r'model\.connection\.hc\.tanh .*True'):
    connections.validate(make_config('hc', dynamic=False), 16)  # tanh=True by default.
  with pytest.raises(ValueError, match=r'model\.connection\.frac\.tanh '):
    connections.validate(make_config('frac', dynamic=False), 16)
  with pytest.raises(ValueError, match=r'model\.connection\.mhc\.n .*1'):
    connections.validate(make_config('mhc', n=1), 16)  # H_pre init logit(1) is infinite.
  with pytest.raises(ValueError, match=r'model\.connection\.vwn\.reduce_norm .*none'):
    connections.validate(make_config('vwn', m=2, n=3), 16)  # Groups of D need m | n.
  # Options a kind does not read are not checked: a static variant ignores the dynamic branch's
  # norm and scale, mhc with n = 1 and H_pre fixed is fine, and the sub-configs of the kinds not
  # chosen are not read at all.
  for kind, overrides in (
      ('hc', dict(dynamic=False, tanh=False, dynamic_norm='bogus', scale=False)),
      ('frac', dict(dynamic=False, tanh=False, dynamic_norm_affine=True, dynamic_norm='none')),
      ('mhc', dict(n=1, mappings=('post', 'res'))),
      ('vwn', dict(m=2, n=3, reduce_norm='none')),
  ):
    connections.validate(make_config(kind, **overrides), 16)
  config = make_config('hc')
  config.mhc.update(sinkhorn_iters=0, post_mult=0.0, reduce='x', mappings=('y',))
  config.frac.m = 3
  connections.validate(config, 16)
  # Every registered kind's defaults are valid (at a width every default divides).
  for kind in connections.KINDS:
    connections.validate(make_config(kind), 16)


@pytest.mark.parametrize('kind,n,mode,want', [
    ('hc', 4, 'none', 1.0), ('hc', 4, 'divide', 0.5), ('hc', 4, 'multiply', 2.0),
    ('mhc', 9, 'divide', 1.0 / 3.0),
])
def test_out_proj_init_multiplier(kind, n, mode, want):
  config = make_config(kind, n=n, out_proj_sqrt_n=mode)
  assert connections.out_proj_init_multiplier(config) == pytest.approx(want)
  # The kinds without out_proj_sqrt_n keep the output projections' init.
  for other in set(connections.KINDS) - {'hc', 'mhc'}:
    assert connections.out_proj_init_multiplier(make_config(other)) == 1.0


# ------------------------------------------------------------------------------ dtype and jit

DTYPE_CASES = [
    ('hc', dict(n=4), ref_hc, ref_hc_coefficients),
    ('frac', dict(m=4, dynamic_norm='rmsnorm'), ref_frac, ref_hc_coefficients),
    ('mhc', dict(n=4), ref_mhc, ref_mhc_coefficients),
]


@pytest.mark.parametrize('kind,overrides,ref,ref_coefficients', DTYPE_CASES)
def test_bfloat16_streams_float32_coefficients(kind, overrides, ref, ref_coefficients):
  d = 16
  config = make_config(kind, **overrides)
  streams, connection = build(config, d)
  randomize(connection, seed=4)
  branch, branch_np = make_branch(d)
  x = streams.expand(random_streams((B, L, d), dtype=jnp.bfloat16))
  x = x + random_streams(x.shape, seed=9, dtype=jnp.bfloat16)  # Non-identical streams.
  assert x.dtype == jnp.bfloat16
  out = connection(x, branch)
  assert out.dtype == jnp.bfloat16 and streams.reduce(out).dtype == jnp.bfloat16
  # The width connection reads the bf16 streams and writes its M > N mixed rows in bf16: the
  # compiled forward keeps no float32 [B, L, M, D] buffer (float32 stays inside fusions).
  compiled = jax.jit(lambda x: connection(x, branch)).lower(x).compile().as_text()
  entry = compiled[compiled.index('ENTRY'):]
  f32_rows = [int(rows) for rows in re.findall(rf'= f32\[{B},{L},(\d+),{x.shape[-1]}\]', entry)]
  assert all(rows <= x.shape[-2] for rows in f32_rows), f32_rows
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  # Coefficients are float32 and as exact as float32 (bf16 arithmetic would be off by ~1e-2).
  for got, want in zip(connection.coefficients(x), ref_coefficients(x64, connection, config)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  want = ref(x64, connection, config, branch_np)
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('kind,overrides', [
    ('hc', dict(n=4)), ('hc', dict(dynamic=False, tanh=False)),
    ('mhc', dict(n=4, reduce='head')), ('frac', dict(m=2)),
])
def test_jit_matches_eager(kind, overrides):
  d = 8
  config = make_config(kind, **overrides)
  streams, connection = build(config, d)
  randomize(connection, seed=8)
  if kind == 'mhc':
    randomize(streams, seed=9)
  branch = make_branch(d)[0]
  h = random_streams((B, L, d))

  def forward(streams, connection, h):
    x = streams.expand(h)
    x = x + 0.1 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))  # Distinct streams.
    return streams.reduce(connection(x, branch))

  eager = forward(streams, connection, h)
  jitted = nnx.jit(forward)(streams, connection, h)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
