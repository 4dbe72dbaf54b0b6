"""Tests of the mesh, the logical rules and sharded model creation on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import helpers
from jax.sharding import PartitionSpec as P

from configs import base
from hyperconn_jax import models, sharding


def mesh_config(shape=(2, 2, 2)):
  c = base.get_config().mesh
  c.shape = shape
  return c


def hc_config():
  """Tiny dynamic HC x4 model whose big dimensions divide the (2, 2, 2) mesh."""
  return helpers.tiny_model('hc', n=4, dynamic=True)


@pytest.fixture(scope='module')
def sharded():
  cfg, mcfg = hc_config(), mesh_config()
  mesh = sharding.make_mesh(mcfg)
  rules = sharding.logical_rules(mcfg)
  return cfg, mesh, rules, models.create_model(cfg, mesh, rules, seed=0)


def test_make_mesh_autofill():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(mesh_config((2, -1, 2)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(mesh_config((1, -1, 1))).shape) == {'data': 1, 'fsdp': 8,
                                                                     'tensor': 1}
  mesh4 = sharding.make_mesh(mesh_config((1, -1, 2)), devices=jax.devices()[:4])
  assert dict(mesh4.shape) == {'data': 1, 'fsdp': 2, 'tensor': 2}
  assert set(mesh4.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize('shape', [(3, -1, 1), (2, 2, 1), (2, 2, 4), (-1, -1, 2), (2, 4),
                                   (0, -1, 1), (2, -2, 2)])
def test_make_mesh_errors(shape):
  with pytest.raises(ValueError, match='mesh.shape'):
    sharding.make_mesh(mesh_config(shape))


def test_logical_rules():
  mcfg = mesh_config()
  rules = sharding.logical_rules(mcfg)
  assert dict(rules)['batch'] == ('data', 'fsdp') and dict(rules)['streams'] is None
  mcfg.rules = (('embed', 'model'),)
  with pytest.raises(ValueError, match='mesh.rules'):
    sharding.logical_rules(mcfg)


def test_logical_to_spec_divisibility_fallback():
  mesh = sharding.make_mesh(mesh_config())
  rules = (('vocab', 'tensor'), ('embed', 'fsdp'), ('mlp', 'fsdp'), ('mlp', 'tensor'),
           ('hc', None))
  assert sharding.logical_to_spec(('vocab', 'embed'), (64, 32), mesh, rules) == P('tensor', 'fsdp')
  # 63 is not divisible by tensor = 2: replicated rather than an error.
  assert sharding.logical_to_spec(('vocab', 'embed'), (63, 32), mesh, rules) == P(None, 'fsdp')
  # 'mlp' falls back to its second rule when 'fsdp' is taken by 'embed'.
  assert sharding.logical_to_spec(('embed', 'mlp'), (32, 64), mesh, rules) == P('fsdp', 'tensor')
  spec = sharding.logical_to_spec(('mlp', None, 'hc'), (64, 3, 5), mesh, rules)
  assert spec == P('fsdp', None, None)
  with pytest.raises(ValueError, match="'heads'"):
    sharding.logical_to_spec(('heads',), (4,), mesh, rules)


def test_batch_sharding():
  mesh = sharding.make_mesh(mesh_config())
  rules = sharding.logical_rules(mesh_config())
  assert sharding.batch_sharding(mesh, rules).spec == P(('data', 'fsdp'), None)


def test_parameters_sharded_per_rules(sharded):
  cfg, mesh, rules, model = sharded
  params = helpers.flat(nnx.state(model))
  specs = {k: v.sharding.spec for k, v in params.items()}
  assert specs[('blocks', 'mlp', 'gate')] == P(None, 'fsdp', 'tensor')
  assert specs[('blocks', 'mlp', 'down')] == P(None, 'tensor', 'fsdp')
  assert specs[('blocks', 'attn', 'q')] == P(None, 'fsdp', 'tensor', None)
  assert specs[('blocks', 'attn', 'o')] == P(None, 'tensor', None, 'fsdp')
  assert specs[('embed', 'embedding')] == P('tensor', 'fsdp')
  # HC coefficients: the stream and 'hc' axes are replicated; W's width axis follows 'embed'.
  assert specs[('blocks', 'attn_connection', 'static_alpha')] == P(None, None, None)
  assert specs[('blocks', 'attn_connection', 'dynamic_alpha')] == P(None, 'fsdp', None)
  # Never whole on one device: a sharded parameter's local shard is smaller than the array.
  gate = params[('blocks', 'mlp', 'gate')]
  assert gate.addressable_shards[0].data.shape == (cfg.num_layers, 16, 32)
  # The abstract model (restore target) carries the same shardings, without allocating.
  _, abstract = models.abstract_model(cfg, mesh, rules)
  for k, v in helpers.flat(abstract).items():
    assert isinstance(v, jax.ShapeDtypeStruct) and v.sharding == params[k].sharding, k


def test_sharded_forward_equals_single_device(sharded):
  cfg, mesh, rules, model = sharded
  tok = jax.random.randint(jax.random.key(0), (4, 8), 0, cfg.vocab_size)
  with sharding.activate(mesh, rules):
    tok_sharded = jax.device_put(tok, sharding.batch_sharding(mesh, rules))
    logits = nnx.jit(lambda m, t: m(t))(model, tok_sharded)
  assert logits.sharding.spec == P(('data', 'fsdp'), None, 'tensor')
  # create_model gives build_model's parameters (same seed) ...
  single = models.build_model(cfg, nnx.Rngs(0))
  sharded_params, single_params = helpers.flat(nnx.state(model)), helpers.flat(nnx.state(single))
  for k, v in single_params.items():
    np.testing.assert_allclose(np.asarray(sharded_params[k]), np.asarray(v), atol=1e-6,
                               err_msg=str(k))
  # ... and with exactly the same weights the single-device forward pass gives the same logits.
  state = nnx.state(single)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {k: jax.device_get(v) for k, v in sharded_params.items()}))
  nnx.update(single, state)
  expected = single(tok)
  assert float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected))) < 1e-5


def test_indivisible_vocab_is_replicated():
  cfg, mcfg = hc_config(), mesh_config()
  cfg.vocab_size = 65
  mesh = sharding.make_mesh(mcfg)
  rules = sharding.logical_rules(mcfg)
  _, abstract = models.abstract_model(cfg, mesh, rules)
  assert helpers.flat(abstract)[('embed', 'embedding')].sharding.spec == P(None, 'fsdp')


def _loss(m, tok):
  logits = m(tok)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tok[:, 1:, None],
                                       axis=-1))


def test_sharded_gradients_equal_single_device(sharded):
  cfg, mesh, rules, model = sharded
  tok = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size)
  with sharding.activate(mesh, rules):
    tok_sharded = jax.device_put(tok, sharding.batch_sharding(mesh, rules))
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, tok_sharded)
  grads = helpers.flat(grads)
  single = models.build_model(cfg, nnx.Rngs(0))
  state = nnx.state(single)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {k: jax.device_get(v) for k, v in helpers.flat(nnx.state(model)).items()}))
  nnx.update(single, state)
  loss_1, grads_1 = nnx.value_and_grad(_loss)(single, tok)
  np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
  for k, g in helpers.flat(grads_1).items():
    np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(g), rtol=1e-4, atol=1e-6,
                               err_msg=str(k))


def test_sequence_sharding_equals_single_device():
  """A mesh axis for the sequence: the rule ('length', 'sequence') shards the activations' length
  axis (streams, logits); loss and gradients equal the unsharded model's."""
  cfg, mcfg = hc_config(), mesh_config()
  cfg.update(dict(attention='chunked', attention_block_q=4, attention_block_kv=4))
  mcfg.axes = ('data', 'sequence', 'tensor')
  mcfg.rules = tuple((name, 'sequence' if name == 'length' else
                      None if axes == 'fsdp' else ('data',) if axes == ('data', 'fsdp') else axes)
                     for name, axes in mcfg.rules)
  mesh, rules = sharding.make_mesh(mcfg), sharding.logical_rules(mcfg)
  model = models.create_model(cfg, mesh, rules, seed=0)
  tok = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
  with sharding.activate(mesh, rules):
    tok_sharded = jax.device_put(tok, sharding.batch_sharding(mesh, rules))
    assert tok_sharded.sharding.spec == P('data', 'sequence')
    logits = nnx.jit(lambda m, t: m(t))(model, tok_sharded)
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, tok_sharded)
  assert logits.sharding.spec == P('data', 'sequence', 'tensor')
  single = models.build_model(cfg, nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(nnx.jit(lambda m, t: m(t))(single, tok)),
                             rtol=1e-5, atol=1e-5)
  loss_1, grads_1 = nnx.jit(nnx.value_and_grad(_loss))(single, tok)
  np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
  grads = helpers.flat(grads)
  for k, g in helpers.flat(grads_1).items():
    np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(g), rtol=1e-4, atol=1e-6,
                               err_msg=str(k))
