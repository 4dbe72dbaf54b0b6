"""Optimizer: weight-decay mask by parameter kind, schedules, gradient accumulation, frozen HC."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
from configs import base
from hyperconn_jax import models, optim, params, sharding, tasks, train_lib


def model_config(**connection):
  """A tiny model with every parameter kind: RMSNorm scales, embeddings, dynamic HC, kernels."""
  c = helpers.tiny_model('hc', n=2, dynamic=True, dynamic_norm='rmsnorm',
                         dynamic_norm_affine=True, **connection)
  c.norm = 'rmsnorm'
  return c


def typed_leaves(state):
  return jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize('decay_embeddings', [False, True])
def test_decay_mask_by_type(decay_embeddings):
  model = models.build_model(model_config(), nnx.Rngs(0))
  _, typed_params, _ = nnx.split(model, nnx.Param, ...)
  mask = optim.decay_mask(typed_params, decay_embeddings)
  # The mask has the structure of the pure parameters, as optax needs.
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(typed_params))
  seen = {}
  for (path, variable), decayed in zip(typed_leaves(typed_params), jax.tree.leaves(mask)):
    kind = type(variable)
    seen.setdefault(kind, set()).add(decayed)
    del path
  assert seen[params.NormScale] == {False}
  assert seen[params.HCStatic] == {False}
  assert seen[params.Embedding] == {decay_embeddings}
  assert seen[params.HCDynamic] == {True}
  assert seen[nnx.Param] == {True}  # Attention / MLP kernels.


def test_adamw_decays_only_masked_parameters():
  """With zero gradients, only decayed parameters move (by -lr * wd * p)."""
  model = models.build_model(model_config(), nnx.Rngs(0))
  _, typed_params, _ = nnx.split(model, nnx.Param, ...)
  pure = nnx.as_pure(typed_params)
  cfg = base.get_config().optim
  cfg.update(schedule='constant', warmup_steps=0, lr=0.1, weight_decay=0.5, grad_clip=0.0)
  mask = optim.decay_mask(typed_params, False)
  tx = optim.make_optimizer(cfg, 10, mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
  for u, p, m in zip(jax.tree.leaves(updates), jax.tree.leaves(pure), jax.tree.leaves(mask)):
    np.testing.assert_allclose(u, -0.1 * 0.5 * p if m else np.zeros_like(p), rtol=1e-6)


def schedule_values(steps, **optim_fields):
  cfg = base.get_config().optim
  cfg.update(lr=1.0, **optim_fields)
  schedule = optim.make_schedule(cfg, 100)
  return [float(schedule(s)) for s in steps]


def test_cosine_schedule():
  values = schedule_values([0, 9, 10, 55, 100], schedule='cosine', warmup_steps=10,
                           final_lr_frac=0.1)
  np.testing.assert_allclose(values[:3], [0.1, 1.0, 1.0], rtol=1e-6)
  # Halfway through the cosine phase: the mean of peak and final.
  np.testing.assert_allclose(values[3], 0.55, rtol=1e-5)
  np.testing.assert_allclose(values[4], 0.1, rtol=1e-6)


def test_constant_schedule():
  np.testing.assert_allclose(schedule_values([0, 4, 5, 99], schedule='constant', warmup_steps=5),
                             [0.2, 1.0, 1.0, 1.0], rtol=1e-6)


def test_step_schedule_factors_relative_to_peak():
  values = schedule_values([3, 20, 79, 80, 89, 90, 99], schedule='step', warmup_steps=4,
                           step_fracs=(0.8, 0.9), step_factors=(0.316, 0.1))
  np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.316, 0.316, 0.1, 0.1], rtol=1e-6)


def test_z_loss_term():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[0, 1, 2], [3, 4, 0]])
  weights = jnp.array([[1., 1., 0.], [1., 0., 1.]])
  sums = tasks.lm_loss_sums(logits, targets, weights, 0.5)
  lse = jax.nn.logsumexp(logits, -1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums['ce'], jnp.sum(weights * ce), rtol=1e-6)
  np.testing.assert_allclose(sums['objective'], jnp.sum(weights * (ce + 0.5 * lse ** 2)), rtol=1e-6)
  assert float(sums['weight']) == 4.0


def test_grad_accumulation_equals_big_batch():
  config = model_config()
  model = models.build_model(config, nnx.Rngs(0))
  graphdef, typed_params, rest = nnx.split(model, nnx.Param, ...)
  pure, rest = nnx.as_pure(typed_params), nnx.as_pure(rest)
  rng = np.random.default_rng(0)
  batch = {'inputs': jnp.asarray(rng.integers(0, 64, (8, 16)), jnp.int32),
           'targets': jnp.asarray(rng.integers(0, 64, (8, 16)), jnp.int32),
           # Uneven weights: per-microbatch means would differ from the big-batch mean.
           'weights': jnp.asarray(rng.random((8, 16)) > 0.3, jnp.float32)}

  def sums_fn(p, b):
    logits = nnx.merge(graphdef, p, rest)(b['inputs'])
    return tasks.lm_loss_sums(logits, b['targets'], b['weights'], 1e-3)

  sums1, grads1 = jax.jit(lambda p: optim.accumulated_grads(sums_fn, p, batch, 1))(pure)
  sums4, grads4 = jax.jit(lambda p: optim.accumulated_grads(sums_fn, p, batch, 4))(pure)
  for k in sums1:
    np.testing.assert_allclose(sums4[k], sums1[k], rtol=1e-6)
  for g1, g4 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
    np.testing.assert_allclose(g4 / sums4['weight'], g1 / sums1['weight'], atol=1e-6, rtol=1e-5)
  assert any(float(jnp.abs(g).max()) > 1e-4 for g in jax.tree.leaves(grads1))


def train_steps(config, batch, num_steps):
  """Runs num_steps jitted, sharded updates of a fresh train state on `batch` (host arrays).

  Returns, on the host: (params, rest) before, (params, rest) after, the last step's metrics.
  """
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    state = train_lib.init_state(config, setup)
    before = jax.device_get((state.params, state.rest))
    step = train_lib.make_train_step(config, setup)
    for _ in range(num_steps):
      state, metrics = step(state, {k: jax.device_put(v, setup.batch_sharding)
                                    for k, v in batch.items()})
    return before, jax.device_get((state.params, state.rest)), jax.device_get(metrics)


def test_frozen_hc_unchanged_and_params_move():
  config = base.get_config()
  config.model = model_config(train_width=False)
  config.optim.update(warmup_steps=0, lr=1e-2)
  config.train.batch_size = 8
  assert any(isinstance(v, params.HCFrozen) for _, v in typed_leaves(
      nnx.state(models.build_model(config.model, nnx.Rngs(0)))))
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 64, (8, 16)).astype(np.int32),
           'targets': rng.integers(0, 64, (8, 16)).astype(np.int32),
           'weights': np.ones((8, 16), np.float32)}
  # Two updates: the scales of the zero-initialised dynamic weights get gradients from the 2nd on.
  (params_before, frozen_before), (params_after, frozen_after), metrics = train_steps(
      config, batch, 2)
  assert jax.tree.leaves(frozen_before), 'train_width=False should create HCFrozen variables'
  assert math.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(a, b)
  moved = {jax.tree_util.keystr(path): not np.array_equal(a, b) for (path, a), b in
           zip(jax.tree_util.tree_leaves_with_path(params_before), jax.tree.leaves(params_after))}
  assert all(moved.values()), [k for k, m in moved.items() if not m]


def test_sharded_train_step_with_accumulation_equals_big_batch():
  """The jitted, sharded update (8 devices) with 2 microbatches matches the one-batch update."""
  rng = np.random.default_rng(1)
  batch = {'inputs': rng.integers(0, 64, (16, 16)).astype(np.int32),
           'targets': rng.integers(0, 64, (16, 16)).astype(np.int32),
           'weights': (rng.random((16, 16)) > 0.2).astype(np.float32)}
  results = []
  for accum in (1, 2):
    config = base.get_config()
    config.model = model_config()
    config.optim.update(warmup_steps=0, grad_accum_steps=accum, z_loss=1e-4)
    config.train.batch_size = 16
    _, (params_after, _), metrics = train_steps(config, batch, 1)
    results.append((params_after, metrics))
  (params1, metrics1), (params2, metrics2) = results
  for key in ('loss', 'z_loss', 'grad_norm', 'tokens'):
    np.testing.assert_allclose(metrics2[key], metrics1[key], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params2)):
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_float32_moments_are_optax_adamw():
  """moment_dtype='float32' is exactly optax.adamw (same state layout: checkpoints restore)."""
  pure = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  grads = {'w': jnp.full((2, 3), 0.3), 'b': jnp.linspace(-1.0, 1.0, 3)}
  cfg = base.get_config().optim
  cfg.update(schedule='constant', warmup_steps=0, grad_clip=0.0)
  mask = {'w': True, 'b': False}
  ours = optim.make_optimizer(cfg, 10, mask)
  reference = optax.adamw(optim.make_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, mask=mask)
  state, ref_state = ours.init(pure), reference.init(pure)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  for _ in range(3):
    updates, state = ours.update(grads, state, pure)
    ref_updates, ref_state = reference.update(grads, ref_state, pure)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bfloat16_moments_over_float32_master_weights():
  """optim.moment_dtype='bfloat16': the Adam moments are stored in bfloat16 (half the optimizer
  state), the parameters stay float32 under bfloat16 compute, and training still follows the
  float32-moment run closely."""
  config = base.get_config()
  config.model.update(model_config().to_dict())
  config.model.update(dtype='bfloat16', param_dtype='float32', num_layers=1)
  config.optim.update(moment_dtype='bfloat16', warmup_steps=0, lr=1e-2)
  config.train.update(batch_size=4, num_steps=10)
  config.data.seq_len = 8
  mcfg = config.mesh
  mcfg.shape = (1, 1, 1)
  mesh = sharding.make_mesh(mcfg, jax.devices()[:1])
  rules = sharding.logical_rules(mcfg)
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 64)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1),
           'weights': jnp.ones((4, 8), jnp.float32)}
  params_after, losses = {}, {}
  for moments in ('float32', 'bfloat16'):
    config.optim.moment_dtype = moments
    with sharding.activate(mesh, rules):
      setup = train_lib.make_setup(config, mesh, rules)
      state = train_lib.init_state(config, setup)
      step = train_lib.make_train_step(config, setup)
      floats = {x.dtype for x in jax.tree.leaves(state.opt_state)
                if jnp.issubdtype(x.dtype, jnp.floating)}
      assert floats == {jnp.dtype(moments)}
      assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
      for _ in range(5):
        state, metrics = step(state, batch)
    params_after[moments], losses[moments] = state.params, float(metrics['loss'])
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=2e-2)
  for a, b in zip(jax.tree.leaves(params_after['bfloat16']),
                  jax.tree.leaves(params_after['float32'])):
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_unknown_moment_dtype_raises():
  cfg = base.get_config().optim
  cfg.moment_dtype = 'float16'
  with pytest.raises(ValueError, match="optim.moment_dtype must be one of .* got 'float16'"):
    optim.make_optimizer(cfg, 10, {})
