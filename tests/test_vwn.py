"""Virtual Width Networks (hyperconn_jax/connections/vwn.py): the (D)GHC equations and the
reduction against plain numpy on random parameters, the parameter count formula, the reduction to
static Frac-Connections at n = m, and the paper experiments.

The references are VWN section 3 written per token in float64 numpy; they share no code with the
package.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import paper
from hyperconn_jax import flops
from hyperconn_jax.analysis import diagnostics, runner, trace
from hyperconn_jax.models import build_model, sizes

B, L, EPS = 2, 3, 1e-5


def make_config(kind='vwn', **options):
  return helpers.connection_config(kind, **options)


build = helpers.build_connection_modules
randomize = helpers.randomize


def value(module, name):
  return np.asarray(getattr(module, name)[...], np.float64)


def make_branch(dim, seed=1):
  w = np.random.default_rng(seed).normal(size=(dim, dim)) / math.sqrt(dim)
  return (lambda y: jnp.tanh(y @ jnp.asarray(w, y.dtype))), (lambda y: np.tanh(y @ w))


def ref_ghc(x, conn, options, branch):
  """VWN section 3 per token: A = S_a o tanh(Hbar W_a / tau) + A, B = S_b o tanh(Hbar W_b / tau)^T
  + B; branch input = Reshape(A_e^T H); out = B^T Reshape(T(.), (m, F)) + A_r^T H."""
  m, n = options.m, options.n
  width = x.shape[-1]
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      h = x[b, t]  # [n, F]
      a, bb = value(conn, 'static_alpha'), value(conn, 'static_beta')
      if options.dynamic:
        hbar = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + EPS)
        tau = math.sqrt(width)
        a = value(conn, 'alpha_scale') * np.tanh(hbar @ value(conn, 'dynamic_alpha') / tau) + a
        bb = (value(conn, 'beta_scale') * np.tanh(hbar @ value(conn, 'dynamic_beta') / tau).T
              + bb)
      y = branch((a[:, :m].T @ h).reshape(-1)).reshape(m, width)
      out[b, t] = bb.T @ y + a[:, m:].T @ h
  return out


def ref_reduce(x, streams, group_norm, d):
  """h = Linear(GroupNorm(H')) with groups of D channels and no affine parameters."""
  flat = x.reshape(*x.shape[:-2], -1)
  if group_norm:
    g = flat.reshape(*flat.shape[:-1], -1, d)
    g = g - g.mean(-1, keepdims=True)
    g = g / np.sqrt(np.mean(g * g, -1, keepdims=True) + EPS)
    flat = g.reshape(flat.shape)
  return flat @ value(streams, 'reduce_proj')


@pytest.mark.parametrize('m,n,dynamic', [(2, 3, True), (2, 4, True), (1, 3, True), (4, 4, True),
                                         (2, 4, False)])
def test_ghc_matches_reference(m, n, dynamic):
  d = 8
  config = make_config(m=m, n=n, dynamic=dynamic, reduce_norm='group' if n % m == 0 else 'none')
  streams, connection = build(config, d, sublayer_index=3)
  randomize(connection, seed=m + n)
  x = streams.expand(jnp.asarray(np.random.default_rng(0).normal(size=(B, L, n * d // m)),
                                 jnp.float32))
  assert x.shape == (B, L, n, d // m)
  branch, branch_np = make_branch(d)
  want = ref_ghc(np.asarray(x, np.float64), connection, config.vwn, branch_np)
  np.testing.assert_allclose(connection(x, branch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('reduce_norm', ['group', 'none'])
def test_reduce_matches_reference(reduce_norm):
  d, m, n = 8, 2, 4
  streams, _ = build(make_config(m=m, n=n, reduce_norm=reduce_norm, reduce_init='normal'), d)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, n, d // m)) * 2 + 1, jnp.float32)
  want = ref_reduce(np.asarray(x, np.float64), streams, reduce_norm == 'group', d)
  np.testing.assert_allclose(streams.reduce(x), want, rtol=1e-5, atol=1e-5)


def test_static_init_is_the_papers():
  """B[i, j] = 1 iff i = j mod m; A = [[I_m, I_m, 0], [0, 0, I_r]]; the 'cyclic' reduce is the mean
  of the segments each backbone segment is written to."""
  m, n, d = 2, 5, 4
  streams, connection = build(make_config(m=m, n=n, reduce_norm='none'), d)
  b = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]], float)
  np.testing.assert_array_equal(value(connection, 'static_beta'), b)
  a = np.zeros((n, m + n))
  a[:m, :m] = np.eye(m)
  a[:, m:] = np.eye(n)
  np.testing.assert_array_equal(value(connection, 'static_alpha'), a)
  np.testing.assert_array_equal(value(connection, 'alpha_scale'), np.ones((n, m + n)))
  np.testing.assert_array_equal(value(connection, 'beta_scale'), np.ones((m, n)))
  x = np.random.default_rng(2).normal(size=(1, 1, n, d // m))
  got = np.asarray(streams.reduce(jnp.asarray(x, jnp.float32)))[0, 0].reshape(m, -1)
  np.testing.assert_allclose(got, [x[0, 0, [0, 2, 4]].mean(0), x[0, 0, [1, 3]].mean(0)],
                             rtol=1e-6)


def _model_config(**options):
  c = helpers.tiny_model('vwn', **options)
  c.tie_embeddings = False
  return c


@pytest.mark.parametrize('m,n,dynamic', [(2, 4, True), (2, 3, False), (4, 8, True)])
def test_parameter_count_formula(m, n, dynamic):
  """Per connection: n (m + n) + m n static, plus F (2m + n) + n (m + n) + m n dynamic; the
  reduction E D; the embedding V E instead of V D (E = (n/m) D, F = D/m)."""
  c = _model_config(m=m, n=n, dynamic=dynamic, reduce_norm='none')
  d, v, layers = c.d_model, c.vocab_size, c.num_layers
  width, wide = d // m, n * d // m
  per_connection = n * (m + n) + m * n
  if dynamic:
    per_connection += width * (2 * m + n) + n * (m + n) + m * n
  counts = sizes.param_counts(c)
  assert counts['connection'] == 2 * layers * per_connection + wide * d
  prenorm = _model_config()
  prenorm.connection.kind = 'residual_prenorm'
  assert counts['other'] == sizes.param_counts(prenorm)['other'] + v * (wide - d)


def test_equals_static_frac_when_n_equals_m():
  """At n = m the embedding is D wide and the GHC matrix is FC's: A_e = Y, A_r = A, and B =
  diag(beta) (B_static is diagonal at n = m); the 'cyclic' reduce is the identity, i.e. FC's
  concatenation. So static VWN with reduce_norm='none' is SFC x m, on random static parameters."""
  d, m = 16, 4
  vwn_streams, vwn_conn = build(make_config(m=m, n=m, dynamic=False, reduce_norm='none'), d)
  frac_streams, frac_conn = build(make_config('frac', m=m, dynamic=False, tanh=False), d)
  rng = np.random.default_rng(3)
  alpha, beta = rng.normal(size=(m, 2 * m)), rng.normal(size=(m,))
  vwn_conn.static_alpha[...] = jnp.asarray(alpha, jnp.float32)
  vwn_conn.static_beta[...] = jnp.asarray(np.diag(beta), jnp.float32)
  frac_conn.static_alpha[...] = jnp.asarray(alpha, jnp.float32)
  frac_conn.static_beta[...] = jnp.asarray(beta, jnp.float32)
  h = jnp.asarray(rng.normal(size=(B, L, d)), jnp.float32)
  branch = make_branch(d)[0]
  got = vwn_streams.reduce(vwn_conn(vwn_streams.expand(h), branch))
  want = frac_streams.reduce(frac_conn(frac_streams.expand(h), branch))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Whole models at init: VWN (n = m, static) gives SFC's (and so Pre-Norm's) logits.
  tokens = jnp.asarray(rng.integers(0, 64, (B, 8)))
  logits = {}
  for kind, options in (('vwn', dict(m=2, n=2, dynamic=False, reduce_norm='none')),
                        ('frac', dict(m=2, dynamic=False, tanh=False)),
                        ('residual_prenorm', {})):
    c = _model_config()
    c.tie_embeddings = True  # E = D at n = m.
    c.connection.kind = kind
    c.connection[kind].update(options)
    logits[kind] = np.asarray(build_model(c, nnx.Rngs(0))(tokens))
  np.testing.assert_allclose(logits['vwn'], logits['frac'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits['vwn'], logits['residual_prenorm'], rtol=1e-5, atol=1e-5)


def test_wide_embedding_needs_untied_unembedding():
  c = _model_config(m=2, n=4)
  c.tie_embeddings = True
  with pytest.raises(ValueError, match=r'model\.tie_embeddings.*vwn.*64 wide'):
    build_model(c, nnx.Rngs(0))


@pytest.mark.parametrize('experiment,wide', [('vwn2', 256), ('vwn1_5', 192)])
def test_paper_experiments_build_train_step_flops_and_analyses(experiment, wide):
  """The paper experiments validate at the CPU scale; a tiny one has its E-wide embedding, finite
  logits, FLOPs above Pre-Norm's, and analyses (the trace's E_0 is n x n, X_out n x m)."""
  assert paper.get_config(f'experiment={experiment},size=cpu').model.connection.vwn.n * 64 == wide
  config = paper.get_config(f'experiment={experiment},size=tiny')
  model = build_model(config.model, nnx.Rngs(0))
  n, m = config.model.connection.vwn.n, config.model.connection.vwn.m
  assert model.embed.embedding.shape == (config.model.vocab_size, n * config.model.d_model // m)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
  assert np.all(np.isfinite(np.asarray(model(jnp.asarray(tokens)))))
  prenorm = paper.get_config('experiment=prenorm,size=tiny')
  assert flops.model_flops_per_step(config) > flops.model_flops_per_step(prenorm)
  loop = trace.loop_layout(model, config.model)
  traced = trace.trace(loop, tokens)
  assert traced['embed_inject'].shape[-2:] == (n, n)
  assert traced['out_extract'].shape[-2:] == (n, m)
  assert traced['extract'].shape[-2:] == (n, m) and traced['inject'].shape[-2:] == (m, n)
  result = runner.analyze_model(loop, [{'inputs': tokens, 'weights': np.ones((2, 16))}],
                                ['connections', 'gain', 'coefficients'])
  assert np.all(np.isfinite(result['connections']['C0']))
  tokens_t = diagnostics.select_tokens(traced, np.ones((2, 16)))
  assert diagnostics.gain(tokens_t)['layer'] == [1, 2, 3, 4]
