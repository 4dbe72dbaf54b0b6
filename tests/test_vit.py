"""Tests of the ViT classifier and the image data: patch order, shapes, init equivalence HC vs
Pre-Norm, dropout, sharded == unsharded, the embedded digits dataset (deterministic disjoint split,
augmentation, mixup, resume), a short training run through train_lib / eval.py that improves
accuracy, configs and parameter counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import base
from configs import vit as vit_configs
from hyperconn_jax import data, models, sharding, train_lib
from hyperconn_jax.data import images
from hyperconn_jax.models import sizes, trunk, vit

B, C = 3, 10


def vit_config(kind='residual_prenorm', pool='gap', **connection):
  """A tiny fp32 ViT on 8x8x1 images: patches 2x2 (16 tokens), d 32, 2 layers, GELU MLP 64."""
  c = helpers.tiny_model(kind, **connection)
  c.update(dict(name='vit', vocab_size=256, mlp_activation='gelu', norm_affine=True))
  c.vit.update(dict(image_size=8, patch_size=2, channels=1, num_classes=C, pool=pool))
  return c


def random_head(model, seed=0):
  """The head starts at zero; give it random weights so that logits depend on the features."""
  params = helpers.flat(model)
  params[('head',)] = jax.random.normal(jax.random.key(seed), params[('head',)].shape)
  helpers.set_flat(model, params)


def images_BxHxWxC(seed=1):
  return jax.random.uniform(jax.random.key(seed), (B, 8, 8, 1), minval=-1, maxval=1)


def test_patchify_row_major():
  x = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  patches = np.asarray(vit.patchify(jnp.asarray(x), 2))
  assert patches.shape == (2, 6, 12)
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(patches[:, i * 3 + j],
                                    x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1))


@pytest.mark.parametrize('pool, length', [('gap', 16), ('token', 17)])
def test_shapes_hidden_and_dropout(pool, length):
  cfg = vit_config('hc', pool, n=2, dynamic=True)
  cfg.vit.dropout = 0.5
  model = models.build_model(cfg, nnx.Rngs(0))
  random_head(model)
  x = images_BxHxWxC()
  logits, hidden, _ = nnx.jit(lambda m, x: m.forward(x, return_hidden=True))(model, x)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert hidden.shape == (cfg.num_layers, 2, B, length, cfg.d_model)
  # Without a key there is no dropout; with one, the same key gives the same output.
  with_key = nnx.jit(lambda m, x, key: m.forward(x, dropout_key=key).logits)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), logits, atol=1e-6)
  dropped = with_key(model, x, jax.random.key(0))
  np.testing.assert_array_equal(with_key(model, x, jax.random.key(0)), dropped)
  assert float(jnp.max(jnp.abs(dropped - logits))) > 1e-3
  assert float(jnp.max(jnp.abs(with_key(model, x, jax.random.key(1)) - dropped))) > 1e-3


@pytest.mark.parametrize('pool, dynamic', [('gap', True), ('token', False)])
def test_init_equals_prenorm(pool, dynamic):
  """HC x2 (DHC / SHC) around the ViT's sub-layers starts as Pre-Norm. HC's final norm sees the
  sum of n identical streams; a negligible eps makes it scale-invariant (as in test_model)."""
  ref_cfg = vit_config('residual_prenorm', pool)
  cfg = vit_config('hc', pool, n=2, dynamic=dynamic, tanh=dynamic)
  ref_cfg.norm_eps = cfg.norm_eps = 1e-12
  ref = models.build_model(ref_cfg, nnx.Rngs(0))
  random_head(ref)
  model = models.build_model(cfg, nnx.Rngs(1))
  src, dst = helpers.flat(ref), helpers.flat(model)
  shared = [k for k in dst if not any(a in trunk.CONNECTION_ATTRS for a in k)]
  assert ('positions',) in shared and ('blocks', 'mlp', 'up') in shared
  fresh = dict(dst)
  helpers.set_flat(model, {**dst, **{k: src[k] for k in shared}})
  x = images_BxHxWxC()
  forward = nnx.jit(lambda m, x: m(x))
  expected = forward(ref, x)
  rel = float(jnp.max(jnp.abs(forward(model, x) - expected)) / jnp.max(jnp.abs(expected)))
  assert rel < 1e-5
  # Not vacuous: other sub-layer weights give other logits.
  helpers.set_flat(model, {**fresh, ('head',): src[('head',)]})
  assert float(jnp.max(jnp.abs(forward(model, x) - expected)) / jnp.max(jnp.abs(expected))) > 1e-2


def test_sharded_equals_unsharded():
  cfg = vit_config('hc', 'token', n=2, dynamic=True)
  mesh_cfg = base.get_config().mesh
  mesh_cfg.shape = (2, 2, 2)
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
  model = models.create_model(cfg, mesh, rules, seed=0)
  params = helpers.flat(model)
  params[('head',)] = jax.random.normal(jax.random.key(0), params[('head',)].shape)
  helpers.set_flat(model, params)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  config = base.get_config()
  config.model = cfg
  from hyperconn_jax import tasks  # pylint: disable=g-import-not-at-top
  with sharding.activate(mesh, rules):
    logits = nnx.jit(lambda m, x: m(x))(model, jax.device_put(
        x, tasks.batch_sharding(config, mesh, rules)))
  single = models.build_model(cfg, nnx.Rngs(0))
  helpers.set_flat(single, {k: jax.device_get(v) for k, v in helpers.flat(model).items()})
  expected = nnx.jit(lambda m, x: m(x))(single, x)
  assert float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected))) < 1e-5


@pytest.mark.parametrize('field, value', [('image_size', 0), ('patch_size', 3), ('pool', 'cls'),
                                          ('dropout', 1.0), ('num_classes', -1)])
def test_validate_names_the_field(field, value):
  helpers.assert_validate_names_field(vit_config(), 'vit', field, value)


def test_configs_and_param_counts():
  for size in ('tiny', 'cpu', 'vit_b16', 'vit_l16'):
    for arg in ('connection=hc,n=2,dynamic=false', 'connection=hc,n=2', 'connection=residual'):
      models.validate(vit_configs.get_config(f'{arg},size={size}').model)
  cfg = vit_configs.get_config('connection=residual,size=vit_b16').model
  d, f, layers, patches = 768, 3072, 12, 196
  per_layer = 4 * d * d + 2 * d * f + 2 * d  # attention, GELU MLP, two LayerNorm scales
  expected = (16 * 16 * 3 * d + d + patches * d + d  # patch embedding + bias, positions, class
              + layers * per_layer + d + d * 1000 + 1000)  # final norm, head + bias
  assert sizes.count_params(cfg) == expected
  assert (cfg.vit.pool, cfg.vit.dropout, cfg.dtype) == ('token', 0.1, 'bfloat16')


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = vit_configs.get_config('size=tiny')
  config.unlock()
  config.data.data_dir = data_dir
  data.ensure_prepared(config)
  return data_dir


def digits_config(data_dir, **overrides):
  config = vit_configs.get_config('connection=hc,n=2,size=tiny')
  config.unlock()
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    section, _, field = key.partition('__')
    config[section][field] = value
  return config


def test_digits_split_is_deterministic_and_disjoint(digits_dir):
  config = digits_config(digits_dir)
  builder = images.Digits(data_dir=digits_dir, file_format='array_record')
  train, validation = (builder.as_data_source(split=s) for s in ('train', 'validation'))
  assert len(train) + len(validation) == 1797
  expected_eval = sum(images._index_hash(i) < images.DIGITS_EVAL_FRACTION for i in range(1797))
  assert len(validation) == expected_eval and 300 < expected_eval < 420
  def keys(source):
    return {np.asarray(source[i]['image']).tobytes() + bytes([int(source[i]['label'])])
            for i in range(len(source))}
  # Distinct images (a few digits are pixel-identical across the two splits in the UCI data,
  # so compare the overlap of the sets against the whole: nearly none).
  assert len(keys(train) & keys(validation)) < 5
  first = next(data.make_eval_iterator(config, num_batches=1))
  again = next(data.make_eval_iterator(config, num_batches=1))
  np.testing.assert_array_equal(first['inputs'], again['inputs'])
  batches = list(data.make_eval_iterator(config, num_batches=0))
  assert sum(float(b['weights'].sum()) for b in batches) == len(validation)
  assert batches[-1]['weights'].min() == 0  # Padded last batch.


def test_train_batches_augmentation_mixup_and_resume(digits_dir):
  config = digits_config(digits_dir, data__mixup_alpha=0.2, data__crop_padding=1)
  iterator = data.make_train_iterator(config)
  batch = next(iterator)
  assert batch['inputs'].shape == (32, 8, 8, 1) and batch['inputs'].dtype == np.float32
  assert batch['targets'].shape == (32, 10) and batch['weights'].shape == (32,)
  assert -1.0 <= batch['inputs'].min() and batch['inputs'].max() <= 1.0
  np.testing.assert_allclose(batch['targets'].sum(-1), 1.0, atol=1e-6)
  assert (batch['targets'] > 0).sum(-1).max() == 2  # Mixed with one other label.
  state = iterator.get_state()
  expected = next(iterator)
  resumed = data.make_train_iterator(config)
  resumed.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(resumed)['inputs'], expected['inputs'])
  # Without mixup or crops the train examples are the prepared images, one-hot labelled.
  plain = next(data.make_train_iterator(digits_config(digits_dir, data__crop_padding=0)))
  np.testing.assert_array_equal(plain['targets'].max(-1), 1.0)
  pixels = np.round((plain['inputs'] + 1) * 255 / 2)
  np.testing.assert_allclose(pixels, np.clip(pixels, 0, 255))
  assert len(np.unique(pixels)) > 10


def test_short_training_improves_accuracy_and_eval_py_agrees(digits_dir, tmp_path):
  """A tiny DHC x2 ViT trained 60 steps through train_lib goes from chance to well above it;
  eval.py reports the same top-1 accuracy from the checkpoint."""
  config = digits_config(digits_dir, train__num_steps=60, train__eval_every=60,
                         train__checkpoint_every=60, train__log_every=1,
                         model__scan_layers=True)
  config.model.vit.patch_size = 4
  config.data.crop_padding = 0
  config.lock()
  workdir = str(tmp_path / 'run')
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['step'] == 60
  assert result['eval_accuracy'] > 0.5, result
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if 'accuracy' in r]
  assert train_rows[-1]['loss'] < train_rows[0]['loss'] - 0.5
  # Update 1 sees the zero-initialised head: all logits 0, argmax 0 (only the 0s are right).
  assert train_rows[0]['step'] == 1 and train_rows[0]['accuracy'] < 0.3
  assert np.mean([r['accuracy'] for r in train_rows[-10:]]) > 0.5
  import eval as eval_main  # pylint: disable=g-import-not-at-top
  evaluated = eval_main.evaluate_checkpoint(workdir, 'latest')
  assert evaluated['eval_examples'] == result['eval_examples']
  np.testing.assert_allclose(evaluated['eval_accuracy'], result['eval_accuracy'], atol=1e-6)
  np.testing.assert_allclose(evaluated['eval_loss'], result['eval_loss'], rtol=1e-5)
