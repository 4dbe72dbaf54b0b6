"""Tests of the decoder LM: init equivalence of every connection kind with Pre-Norm, causality,
scan == Python loop, remat == no remat, gradient reach, parameter counts, validation, bf16."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import lm
from hyperconn_jax import models, params
from hyperconn_jax.models import layers, sizes, trunk

B, L, V = 2, 8, helpers.TINY_VOCAB


def tiny_config(kind='residual_prenorm', **connection):
  """A tiny fp32 model: d 32, 2 layers of 2 heads x 16, SwiGLU 64, vocab 64."""
  if kind in ('hc', 'frac') and not connection.get('dynamic', True):
    connection.setdefault('tanh', False)  # tanh acts on the dynamic branch only.
  return helpers.tiny_model(kind, **connection)


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


def is_connection_path(path):
  return any(k in trunk.CONNECTION_ATTRS for k in path)


def copy_sublayer_weights(src, dst):
  """Copies embedding / attention / MLP / norm weights of src into dst; returns the copied paths.
  Every parameter of dst outside its connection modules must have a counterpart in src."""
  src_flat, dst_flat = helpers.flat(src), helpers.flat(dst)
  shared = [k for k in dst_flat if not is_connection_path(k)]
  assert shared and all(k in src_flat for k in shared)
  helpers.set_flat(dst, {**dst_flat, **{k: src_flat[k] for k in shared}})
  return shared


def perturb(model, seed=1, scale=0.05):
  """Adds pseudo-random noise to every parameter, so that zero-initialised HC weights become
  active (a sine hash: cheaper to compile than one jax.random call per parameter)."""
  @jax.jit
  def noisy(state):
    leaves, treedef = jax.tree.flatten(state)
    return treedef.unflatten([
        x + scale * jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * 12.9898
                            + 7.0 * i + seed).astype(x.dtype)
        for i, x in enumerate(leaves)])
  nnx.update(model, noisy(nnx.state(model)))


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# (kind, connection options, tolerance of the init equivalence with Pre-Norm).
# HC and Frac start exactly at Pre-Norm (HC Eq. 14, FC Eq. 15): fp32 rounding only.
HC_VARIANTS = [('hc', dict(n=n, dynamic=dyn), 1e-5) for n in (1, 2, 4, 8) for dyn in (False, True)]
FRAC_VARIANTS = [('frac', dict(m=m, dynamic=dyn), 1e-5) for m in (1, 2, 4, 8)
                 for dyn in (False, True)]
# mHC starts near Pre-Norm: H_res is a Sinkhorn projection (doubly stochastic to the precision of
# 20 iterations), so identical streams stay identical up to that precision.
# n = 1 needs a fixed H_pre (= 1): a learned one starts at logit(1/n), infinite for n = 1.
MHC_VARIANTS = [('mhc', dict(n=n, res_init=r), 1e-4) for n in (2, 4, 8)
                for r in ('identity', 'uniform')]
MHC_VARIANTS += [('mhc', dict(n=1, mappings=('post', 'res')), 1e-4)]
# AltUp with P = I, g = 1 gives every block each sub-layer's output: exactly Pre-Norm.
ALTUP_VARIANTS = [('altup', dict(n=k), 1e-5) for k in (2, 3)]
ALL_VARIANTS = HC_VARIANTS + FRAC_VARIANTS + MHC_VARIANTS + ALTUP_VARIANTS


def variant_id(v):
  kind, opts, _ = v
  return kind + '-' + '-'.join(f'{k}{v}' for k, v in opts.items())


@pytest.mark.parametrize('variant', ALL_VARIANTS, ids=variant_id)
def test_init_equals_prenorm(variant):
  kind, opts, tol = variant
  # HC sums n identical streams, so the final norm sees n * h: its eps then counts n^2 times less
  # relative to the variance. A negligible eps makes both norms scale-invariant, so the comparison
  # measures the connections and not the eps.
  ref_cfg = tiny_config()
  ref_cfg.norm_eps, ref_cfg.scan_layers = 1e-12, False
  cfg = tiny_config(kind, **opts)
  cfg.norm_eps, cfg.scan_layers = 1e-12, False
  ref = models.build_model(ref_cfg, nnx.Rngs(0))
  model = models.build_model(cfg, nnx.Rngs(1))
  copy_sublayer_weights(ref, model)
  tok = tokens()
  ref_logits = ref(tok)
  logits = model(tok)
  assert logits.dtype == jnp.float32 and logits.shape == (B, L, V)
  assert rel_err(logits, ref_logits) < tol
  # Not vacuous: a model whose sub-layer weights differ gives different logits.
  assert rel_err(models.build_model(cfg, nnx.Rngs(1))(tok), ref_logits) > 1e-2


@pytest.mark.parametrize('kind, opts', [('hc', dict(n=4, dynamic=True)), ('mhc', dict(n=4)),
                                        ('resi_dual', {}), ('altup', dict(n=2))],
                         ids=['hc', 'mhc', 'resi_dual', 'altup'])
def test_causal_through_gradients(kind, opts):
  cfg = tiny_config(kind, **opts)
  model = models.build_model(cfg, nnx.Rngs(0))
  perturb(model)  # Makes the dynamic coefficients depend on the token.
  h_BxLxD = model.embed(tokens())
  w_BxV = jax.random.normal(jax.random.key(2), (B, V))

  @nnx.jit
  @functools.partial(nnx.grad, argnums=1)
  def grad_fn(m, h, t):
    return jnp.sum(jnp.take(m.forward_embeddings(h).logits, t, axis=1) * w_BxV)

  for t in (0, 3, L - 1):
    g_BxLxD = grad_fn(model, h_BxLxD, t)
    norm_L = jnp.sqrt(jnp.sum(jnp.square(g_BxLxD), axis=(0, 2)))
    assert np.all(np.asarray(norm_L[t + 1:]) == 0), (t, norm_L)
    assert np.all(np.asarray(norm_L[:t + 1]) > 0), (t, norm_L)


@pytest.mark.parametrize('spec, x_shape, w_shape, in_axes', [
    ('bld,df->blf', (2, 3, 4), (4, 5), 1),
    ('bld,dhk->blhk', (2, 3, 4), (4, 2, 3), 1),
    ('blhk,hkd->bld', (2, 3, 2, 3), (2, 3, 4), 2),
])
def test_project_equals_einsum(spec, x_shape, w_shape, in_axes):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  np.testing.assert_allclose(layers.project(x, w, in_axes=in_axes), jnp.einsum(spec, x, w),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='contracted axes'):
    layers.project(x, w.reshape(-1)[None, :], in_axes=in_axes)


def test_rope_rotates_pairs_by_position_and_keeps_relative_dot_products():
  theta, (b, l, h, k) = 10000.0, (2, 300, 2, 8)
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, l, h, k)))
  angle = np.arange(l)[:, None] * theta ** (-np.arange(k // 2) / (k // 2))  # [L, K/2]
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  x1, x2 = x[..., :k // 2], x[..., k // 2:]
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  got = layers.rope(jnp.asarray(x), theta)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # The same vector at positions (i, j) and (i + s, j + s) has the same dot product.
  same = np.broadcast_to(x[:1, :1], x.shape)
  r = np.asarray(layers.rope(jnp.asarray(same), theta))[0, :, 0]
  np.testing.assert_allclose(r[5] @ r[2], r[290] @ r[287], rtol=1e-5)
  # The tables are constants of the compiled step, not sin / cos evaluated per element.
  hlo = jax.jit(functools.partial(layers.rope, theta=theta)).lower(got).as_text()
  assert not re.search(r'\b(sine|cosine)\b', hlo)


def test_scan_equals_python_loop():
  cfg = tiny_config('hc', n=4, dynamic=True)
  scanned = models.build_model(cfg, nnx.Rngs(0))
  perturb(scanned)
  loop_cfg = tiny_config('hc', n=4, dynamic=True)
  loop_cfg.scan_layers = False
  loop = models.build_model(loop_cfg, nnx.Rngs(5))
  assert not loop.scan_layers and scanned.scan_layers
  # The deterministic HC init (A_m's home stream (k + index_base) mod n) is the same whether the
  # layer index is traced (nnx.vmap) or a Python int.
  fresh = helpers.flat(models.build_model(cfg, nnx.Rngs(0)))
  for l in range(cfg.num_layers):
    for module in ('attn_connection', 'mlp_connection'):
      np.testing.assert_array_equal(fresh[('blocks', module, 'static_alpha')][l],
                                    helpers.flat(loop)[('blocks', l, module, 'static_alpha')])
  trunk.copy_weights(scanned, loop)
  tok = tokens()
  logits_s, hidden_s, _ = scanned.forward(tok, return_hidden=True)
  logits_l, hidden_l, _ = loop.forward(tok, return_hidden=True)
  assert hidden_s.shape == (cfg.num_layers, 2, B, L, cfg.d_model)
  # Hidden [0, 0] is the first attention's branch input: the embedding mixed by A_m (row 0).
  alpha_0 = nnx.state(scanned)['blocks']['attn_connection']['static_alpha'][...][0, :, 0]
  expected = jnp.sum(alpha_0) * scanned.embed(tok)  # Identical streams; dynamic part ~ small.
  assert rel_err(hidden_s[0, 0], expected) < 0.1
  assert rel_err(hidden_s[0, 1], expected) > 1e-3  # The MLP saw the attention's output too.
  assert rel_err(logits_l, logits_s) < 1e-5
  assert rel_err(hidden_l, hidden_s) < 1e-5
  # Per-layer HC static init differs between layers (sub-layer index drives A_m's home stream).
  alpha = nnx.state(scanned)['blocks']['attn_connection']['static_alpha'][...]
  assert not np.allclose(alpha[0], alpha[1])
  # And back: loop -> scanned reproduces the original parameters exactly.
  back = models.build_model(cfg, nnx.Rngs(7))
  trunk.copy_weights(loop, back)
  for k, v in helpers.flat(scanned).items():
    np.testing.assert_array_equal(helpers.flat(back)[k], v)


def test_scan_unroll_resolves_and_keeps_numerics():
  # Tests run on CPU: auto unrolls up to CPU_UNROLL_MAX_LAYERS layers, without remat only.
  assert trunk.scan_unroll(0, 2) == 2 and trunk.scan_unroll(0, 2, 'save_streams') == 1
  assert trunk.scan_unroll(0, trunk.CPU_UNROLL_MAX_LAYERS + 1) == 1
  assert trunk.scan_unroll(2, 2, 'full') == 2  # Asked for explicitly.
  assert trunk.scan_unroll(3, 2) == 2 and trunk.scan_unroll(1, 4) == 1
  results = []
  for unroll in (0, 1):
    cfg = tiny_config('hc', n=2, dynamic=True)
    cfg.scan_unroll = unroll
    model = models.build_model(cfg, nnx.Rngs(0))
    perturb(model)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens()))(state))
    assert ('unroll=2' in jaxpr) == (unroll == 0)  # The scan over the 2 layers.
    results.append(_loss_and_grads(model, tokens()))
  (loss_auto, grads_auto), (loss_loop, grads_loop) = results
  assert rel_err(loss_auto, loss_loop) < 1e-6
  for k, g in grads_loop.items():
    assert rel_err(grads_auto[k], g) < 1e-5, k


def _loss_and_grads(model, tok):
  def loss_fn(m):
    logits = m(tok)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tok[:, 1:, None], axis=-1))
  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  return loss, helpers.flat(grads)


def _has_remat(model, tok):
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda s: nnx.merge(graphdef, s)(tok).sum()))(state)
  return re.search(r'\b(remat\w*|checkpoint)\[', str(jaxpr)) is not None


@pytest.fixture(scope='module')
def no_remat_run():
  """A dynamic HC model (random, non-init parameters) without remat, its loss and gradients."""
  cfg = tiny_config('hc', n=2, dynamic=True)
  model = models.build_model(cfg, nnx.Rngs(0))
  perturb(model)
  return cfg, model, _loss_and_grads(model, tokens())


def test_remat_saves_memory_under_the_default_scan_unroll():
  # On CPU an unrolled scan let XLA undo remat; auto keeps the loop when remat is asked for.
  def temp_bytes(policy):
    cfg = tiny_config('hc', n=4, dynamic=True)
    cfg.num_layers, cfg.remat_policy = 3, policy
    graphdef, state = nnx.split(models.build_model(cfg, nnx.Rngs(0)))
    tok = jnp.zeros((2, 128), jnp.int32)
    grad = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tok) ** 2)))
    return grad.lower(state).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes('full') < 0.7 * temp_bytes('none')


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch', 'save_streams',
                                    'offload_streams'])
def test_remat_equals_no_remat(policy, no_remat_run):
  plain_cfg, plain, (loss_p, grads_p) = no_remat_run
  remat_cfg = tiny_config('hc', n=2, dynamic=True)
  remat_cfg.remat_policy = policy
  # Guard against comparing a config with itself (nanodo's remat test did).
  assert plain_cfg.remat_policy == 'none' and remat_cfg.remat_policy != plain_cfg.remat_policy
  remat = models.build_model(remat_cfg, nnx.Rngs(3))
  trunk.copy_weights(plain, remat)
  tok = tokens()
  # The policy is really applied: the differentiated program contains a remat region.
  assert _has_remat(remat, tok) and not _has_remat(plain, tok)
  loss_r, grads_r = _loss_and_grads(remat, tok)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  assert grads_r.keys() == grads_p.keys()
  for k, g in grads_p.items():
    np.testing.assert_allclose(grads_r[k], g, rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_unknown_remat_policy_raises():
  cfg = tiny_config()
  cfg.remat_policy = 'everything'
  with pytest.raises(ValueError, match='model.remat_policy'):
    trunk.remat_policy(cfg.remat_policy)
  with pytest.raises(ValueError, match='model.remat_policy'):
    models.build_model(cfg, nnx.Rngs(0))


# Connection parameters whose gradient is exactly zero at init: the scalar scales / gates multiply
# tanh(Hbar W) or (x phi), and the dynamic norm's scale only feeds Hbar W; all are 0 while the
# dynamic weights W / phi are 0 (their zero init, HC Eq. 14, FC Eq. 15, mHC).
ZERO_GRAD_AT_INIT = ('alpha_scale', 'beta_scale', 'gate_pre', 'gate_post', 'gate_res',
                     'norm_scale')


@pytest.mark.parametrize('kind, opts', [
    ('hc', dict(n=4, dynamic=True)), ('hc', dict(n=2, dynamic=False)),
    ('frac', dict(m=4, dynamic=True, dynamic_norm='rmsnorm', dynamic_norm_affine=True)),
    ('mhc', dict(n=4, res_init='identity')), ('mhc', dict(n=2, res_init='uniform')),
    ('altup', dict(n=2)), ('resi_dual', dict())],
    ids=['hc-dyn', 'hc-static', 'frac-dyn', 'mhc-identity', 'mhc-uniform', 'altup', 'resi_dual'])
def test_gradients_reach_every_connection_parameter(kind, opts):
  cfg = tiny_config(kind, **opts)
  model = models.build_model(cfg, nnx.Rngs(0))
  _, grads = _loss_and_grads(model, tokens())
  conn = {k: np.asarray(g) for k, g in grads.items() if is_connection_path(k)}
  assert conn, 'the model has no connection parameters'
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
  n = opts.get('n')  # mhc's streams.
  for path, g in conn.items():
    name = path[-1]
    if name in ZERO_GRAD_AT_INIT:
      assert np.all(g == 0), path
      continue
    if kind == 'mhc' and name in ('phi', 'bias'):
      # Columns [2n:] produce H_res: with identical streams (as at init) any doubly stochastic
      # H_res gives the same output, so the Sinkhorn projection passes (numerically) no gradient.
      g_res, g = g[..., 2 * n:], g[..., :2 * n]
      assert np.max(np.abs(g_res)) < 1e-6 * np.max(np.abs(g)), path
    assert np.all(g != 0), (path, g)


OLMO_1B = 1_176_764_416  # HC Table 7: 1.17676442B.


def _olmo(size, kind='residual_prenorm', **connection):
  c = tiny_config(kind, **connection)
  sizes.apply_size(c, size)
  return c


@pytest.mark.parametrize('size, kind, opts, total, extra', [
    ('olmo_1b', 'residual_prenorm', {}, OLMO_1B, 0),
    # HC App. B Eq. 25: (|theta_norm| + d(n+2) + n(n+2) + 2) * 2L = (0 + 12288 + 26) * 32.
    ('olmo_1b', 'hc', dict(n=4, dynamic=True), OLMO_1B + 394_048, 394_048),
    # HC Eq. 22: n(n+2) * 2L = 24 * 32.
    ('olmo_1b', 'hc', dict(n=4, dynamic=False), OLMO_1B + 768, 768),
    # FC Eq. 19: (d/m + (d/m)(2m+1) + m(2m+1) + 2) * 2L = (512 + 4608 + 36 + 2) * 32.
    ('olmo_1b', 'frac', dict(m=4, dynamic=True, dynamic_norm='rmsnorm', dynamic_norm_affine=True),
     OLMO_1B + 165_056, 165_056),
    ('olmo_7b', 'residual_prenorm', {}, 6_888_095_744, 0),  # HC Table 7: 6.88809574B.
], ids=['olmo1b', 'olmo1b-dhc4', 'olmo1b-shc4', 'olmo1b-dfc4', 'olmo7b'])
def test_param_counts(size, kind, opts, total, extra):
  counts = sizes.param_counts(_olmo(size, kind, **opts))
  assert counts == {'total': total, 'connection': extra, 'other': total - extra}
  assert sizes.count_params(_olmo(size, kind, **opts)) == total


@pytest.mark.parametrize('field, value', [
    ('name', 'resnet'), ('vocab_size', 0), ('d_model', -8), ('d_model', 32.0), ('num_layers', True),
    ('num_heads', 0), ('head_dim', 15), ('head_dim', 0), ('mlp_dim', -1), ('norm', 'batchnorm'),
    ('norm_eps', 0.0), ('rope_theta', -1.0), ('init_std', 0), ('qk_norm', 'yes'),
    ('tie_embeddings', 1), ('scan_layers', None), ('dtype', 'float16'), ('param_dtype', 'int8'),
    ('remat_policy', 'everything'), ('connection.kind', 'highway'), ('connection.hc.n', 0),
    ('scan_unroll', -1), ('scan_unroll', True),
])
def test_validate_names_the_field(field, value):
  cfg = tiny_config('hc')
  *parents, leaf = field.split('.')
  target = cfg
  for key in parents:
    target = target[key]
  with target.ignore_type():
    target[leaf] = value
  with pytest.raises(ValueError, match=rf'model\.{re.escape(field)}\b'):
    models.validate(cfg)
  with pytest.raises(ValueError, match=rf'model\.{re.escape(field)}\b'):
    models.build_model(cfg, nnx.Rngs(0))


@pytest.mark.parametrize('kind, opts', [('residual_prenorm', {}), ('hc', dict(n=4)),
                                        ('mhc', dict(n=4)), ('frac', dict(m=4))])
def test_bfloat16_compute(kind, opts):
  cfg32 = tiny_config(kind, **opts)
  cfg32.scan_layers = False
  cfg16 = tiny_config(kind, **opts)
  cfg16.scan_layers, cfg16.dtype = False, 'bfloat16'
  model32 = models.build_model(cfg32, nnx.Rngs(0))
  model16 = models.build_model(cfg16, nnx.Rngs(0))
  perturb(model32)
  trunk.copy_weights(model32, model16)
  assert all(v.dtype == jnp.float32 for v in helpers.flat(model16).values())
  tok = tokens()
  logits16 = model16(tok)
  assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
  # bf16 has an 8-bit mantissa: close to fp32, but not equal (the compute dtype is really used).
  err = rel_err(logits16, model32(tok))
  assert 1e-6 < err < 5e-2


@pytest.mark.parametrize('mode, factor', [('none', 1.0), ('multiply', 2.0), ('divide', 0.5)])
def test_out_proj_init_scaled_by_sqrt_n(mode, factor):
  # HC section 4: the attention out-projection and the MLP down-projection (only) get sqrt(n).
  cfg = tiny_config('hc', n=4, out_proj_sqrt_n=mode)
  cfg.update(dict(d_model=64, mlp_dim=256, num_heads=4))
  flat = helpers.flat(models.build_model(cfg, nnx.Rngs(0)))
  for name in (('attn', 'o'), ('mlp', 'down')):
    std = float(jnp.std(flat[('blocks',) + name]))
    assert abs(std / (cfg.init_std * factor) - 1) < 0.05, (name, std)
  for name in (('attn', 'q'), ('mlp', 'gate')):
    assert abs(float(jnp.std(flat[('blocks',) + name])) / cfg.init_std - 1) < 0.05, name


def test_rmsnorm_qk_norm_untied_parameters():
  cfg = tiny_config('residual_postnorm')
  cfg.update(dict(norm='rmsnorm', qk_norm=True, tie_embeddings=False))
  d, k, f, layers_ = cfg.d_model, cfg.head_dim, cfg.mlp_dim, cfg.num_layers
  per_block = 4 * d * cfg.num_heads * k + 3 * d * f + 2 * k  # + q/k norm scales
  # Post-Norm: the branches have no pre-norm, each connection has its own RMSNorm scale (d).
  expected = 2 * V * d + d + layers_ * (per_block + 2 * d)
  counts = sizes.param_counts(cfg)
  conn = 2 * d * layers_
  assert counts == {'total': expected, 'connection': conn, 'other': expected - conn}
  model = models.build_model(cfg, nnx.Rngs(0))
  assert model.blocks.attn_norm is None and model.blocks.mlp_norm is None
  assert isinstance(model.blocks.attn.q_norm.scale, params.NormScale)
  logits = model(tokens())
  assert logits.shape == (B, L, V) and bool(jnp.all(jnp.isfinite(logits)))


def test_mitchell_init():
  """OLMo's mitchell init: truncated normal of std 1/sqrt(fan-in) (cut at 3 std); the output
  projections of block l divided by sqrt(2 (l + 1)); the OLMo sizes use it."""
  cfg = tiny_config('hc', n=2)
  cfg.update(dict(init='mitchell', d_model=128, mlp_dim=512, num_heads=4, head_dim=32,
                  num_layers=3))
  flat = helpers.flat(models.build_model(cfg, nnx.Rngs(0)))
  d, f = cfg.d_model, cfg.mlp_dim
  for l in range(cfg.num_layers):
    out_factor = 1.0 / np.sqrt(2.0 * (l + 1))
    for name, fan_in, factor in ((('attn', 'q'), d, 1.0), (('mlp', 'up'), d, 1.0),
                                 (('attn', 'o'), d, out_factor), (('mlp', 'down'), f, out_factor)):
      w = np.asarray(flat[('blocks',) + name][l])
      std = factor / np.sqrt(fan_in)
      # A normal truncated at 3 std has std 0.986 std.
      assert abs(w.std() / (0.986 * std) - 1) < 0.05, (l, name, w.std(), std)
      assert np.abs(w).max() <= 3 * std * (1 + 1e-6), (l, name)
  emb = np.asarray(flat[('embed', 'embedding')])
  assert abs(emb.std() / (0.986 / np.sqrt(d)) - 1) < 0.05
  olmo = lm.get_config('size=olmo_1b')
  assert (olmo.model.init, olmo.model.dtype, olmo.model.param_dtype,
          olmo.model.stream_dtype) == ('mitchell', 'bfloat16', 'float32', 'float32')


def test_float32_streams_under_bfloat16_compute(kind='hc', opts=dict(n=2)):
  """model.stream_dtype: the residual streams (what every branch receives, and adds back into)
  keep float32 under bfloat16 compute, which is closer to float32 than bfloat16 streams."""
  results = {}
  for stream_dtype in ('float32', 'bfloat16'):
    cfg = tiny_config(kind, **opts)
    cfg.update(dict(dtype='bfloat16', stream_dtype=stream_dtype, num_layers=4))
    model = models.build_model(cfg, nnx.Rngs(0))
    perturb(model)
    logits, hidden, _ = model.forward(tokens(), return_hidden=True)
    assert hidden.dtype == jnp.dtype(stream_dtype)
    results[stream_dtype] = logits
  cfg32 = tiny_config(kind, **opts)
  cfg32.num_layers = 4
  model32 = models.build_model(cfg32, nnx.Rngs(0))
  perturb(model32)
  exact = model32(tokens())
  assert rel_err(results['float32'], exact) < rel_err(results['bfloat16'], exact)
