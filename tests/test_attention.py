"""Tests of the attention implementations (models/attention.py): rows, chunked and splash equal
the dense reference in values and gradients, rows skips the masked tiles, chunked memory grows
linearly in L, splash compiles for a TPU topology (libtpu, no TPU needed), and every
implementation that cannot run fails clearly."""

import jax
import jax.numpy as jnp
from jax.experimental import topologies
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import base
from hyperconn_jax import models, sharding
from hyperconn_jax.models import attention


def qkv_and_cotangent(shape, dtype=jnp.float32, seed=0):
  return [jax.random.normal(k, shape, dtype) for k in jax.random.split(jax.random.key(seed), 4)]


def value_and_grads(fn, q, k, v, g):
  """sum(fn(q, k, v) * g) and its gradients in q, k, v (g: a fixed random cotangent)."""
  return jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g), argnums=(0, 1, 2)))(q, k, v)


def compiled_grad(fn, shape):
  """The compiled gradient of sum(fn(q, k, v)) in q, k, v, all of `shape` (a ShapeDtypeStruct)."""
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
  return grad.lower(shape, shape, shape).compile()


def assert_close(got, want, tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.max(np.abs(b)))), rtol=0)


# (L, block_q, block_kv): blocks that divide L, that do not (unequal ones), a block longer than L.
@pytest.mark.parametrize('length,block_q,block_kv,causal', [
    (16, 4, 4, True), (19, 8, 5, True), (33, 16, 8, False), (12, 64, 64, True)])
def test_chunked_equals_xla(length, block_q, block_kv, causal):
  q, k, v, g = qkv_and_cotangent((2, length, 3, 8))
  want = value_and_grads(lambda q, k, v: attention.xla(q, k, v, causal=causal), q, k, v, g)
  got = value_and_grads(lambda q, k, v: attention.chunked(
      q, k, v, causal=causal, block_q=block_q, block_kv=block_kv), q, k, v, g)
  assert_close(got, want, 1e-5)


# (L, block_rows): blocks that divide L, that do not, a block longer than L.
@pytest.mark.parametrize('length,block_rows,causal', [
    (16, 4, True), (19, 5, True), (12, 64, True), (19, 5, False)])
def test_rows_equals_xla(length, block_rows, causal):
  q, k, v, g = qkv_and_cotangent((2, length, 3, 8))
  want = value_and_grads(lambda q, k, v: attention.xla(q, k, v, causal=causal), q, k, v, g)
  got = value_and_grads(lambda q, k, v: attention.rows(
      q, k, v, causal=causal, block_rows=block_rows), q, k, v, g)
  assert_close(got, want, 1e-5)


def test_rows_skips_the_masked_tiles():
  """Causal with 4 blocks: (1 + 1/4) / 2 of the dense reference's FLOPs, forward + backward."""
  shape = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.float32)

  def flops(fn):
    return compiled_grad(fn, shape).cost_analysis()['flops']

  ratio = (flops(lambda q, k, v: attention.rows(q, k, v, causal=True, block_rows=64))
           / flops(lambda q, k, v: attention.xla(q, k, v, causal=True)))
  assert 0.55 < ratio < 0.7, ratio


def test_chunked_equals_xla_bfloat16():
  q, k, v, g = qkv_and_cotangent((2, 40, 2, 16), jnp.bfloat16)
  want = value_and_grads(lambda q, k, v: attention.xla(q, k, v, causal=True), q, k, v, g)
  got = value_and_grads(lambda q, k, v: attention.chunked(
      q, k, v, causal=True, block_q=16, block_kv=8), q, k, v, g)
  assert got[0].dtype == jnp.float32 and all(x.dtype == jnp.bfloat16 for x in got[1])
  assert_close(got, want, 3e-2)


def attention_grad_temp_bytes(fn, length):
  compiled = compiled_grad(fn, jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32))
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_in_length():
  """Forward + backward temporaries: chunked doubles with L, xla quadruples."""
  def chunked(q, k, v):
    return attention.chunked(q, k, v, causal=True, block_q=128, block_kv=128)

  def xla(q, k, v):
    return attention.xla(q, k, v, causal=True)

  chunked_sizes = [attention_grad_temp_bytes(chunked, n) for n in (512, 1024)]
  xla_sizes = [attention_grad_temp_bytes(xla, n) for n in (512, 1024)]
  assert chunked_sizes[1] / chunked_sizes[0] < 2.2, chunked_sizes
  assert xla_sizes[1] / xla_sizes[0] > 3.5, xla_sizes
  assert xla_sizes[1] / chunked_sizes[1] > 8, (xla_sizes, chunked_sizes)


def model_config(name, attention_name, **overrides):
  c = base.get_config().model
  c.update(dict(name=name, vocab_size=64, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                mlp_dim=64, qk_norm=True, attention=attention_name, attention_block_q=8,
                attention_block_kv=4, attention_block_rows=4))
  c.update(overrides)
  c.connection.update(dict(kind='hc', n=2))
  if name == 'vit':
    c.vit.update(dict(image_size=8, patch_size=2, pool='token'))  # 17 positions: not a block.
  return c


@pytest.mark.parametrize('name', ['decoder_lm', 'vit'])
def test_chunked_and_rows_models_equal_xla_model(name):
  """Causal with RoPE (decoder) and bidirectional (ViT), with QK-norm, values and gradients."""
  inputs = (jax.random.randint(jax.random.key(1), (2, 13), 0, 64) if name == 'decoder_lm'
            else jax.random.normal(jax.random.key(1), (2, 8, 8, 1)))

  def loss(model):
    return jnp.sum(jnp.sin(model(inputs)))

  (want_loss, want_grads), *results = [
      nnx.jit(nnx.value_and_grad(loss))(models.build_model(model_config(name, impl), nnx.Rngs(0)))
      for impl in ('xla', 'chunked', 'rows')]
  want = helpers.flat(want_grads)
  for got_loss, got_grads in results:
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    got = helpers.flat(got_grads)
    for key in want:
      assert_close(got[key], want[key], 1e-4)


def test_resolve():
  assert attention.resolve('auto', jnp.float32, 256, on='cpu') == 'chunked'
  assert attention.resolve('auto', jnp.bfloat16, 256, on='tpu') == 'splash'
  assert attention.resolve('auto', jnp.bfloat16, 197, on='tpu') == 'chunked'  # ViT-B/16
  assert attention.resolve('auto', jnp.bfloat16, 256, on='gpu') == 'cudnn'
  assert attention.resolve('auto', jnp.float32, 256, on='gpu') == 'chunked'
  assert attention.resolve('chunked', jnp.float32, 256, on='tpu') == 'chunked'
  # CPU: rows where chunked would run one tile (L <= its smaller block), chunked beyond.
  assert attention.resolve('auto', jnp.float32, 512, on='cpu', chunk=512) == 'rows'
  assert attention.resolve('auto', jnp.float32, 513, on='cpu', chunk=512) == 'chunked'
  assert attention.resolve('auto', jnp.float32, 256, on='gpu', chunk=512) == 'chunked'
  assert attention.resolve('auto', jnp.bfloat16, 256, on='tpu', chunk=512) == 'splash'


@pytest.mark.parametrize('name,message', [
    ('splash', r"model.attention='splash' needs a TPU backend, but this one is CPU"),
    ('cudnn', r"model.attention='cudnn' needs a GPU backend, but this one is CPU")])
def test_unavailable_implementation_fails_before_compiling(name, message):
  c = model_config('decoder_lm', name, dtype='bfloat16')
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build_model(c, nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens)


def test_cudnn_needs_bfloat16_on_gpu_too():
  with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype='bfloat16'"):
    attention.resolve('cudnn', jnp.float32, 256, on='gpu')


@pytest.mark.parametrize('field,value', [('attention', 'flash'), ('attention_block_q', 0),
                                         ('attention_block_kv', 2.5),
                                         ('attention_block_rows', True)])
def test_validate_names_the_field(field, value):
  c = model_config('decoder_lm', 'auto')
  with c.ignore_type():
    c[field] = value
  with pytest.raises(ValueError, match=f'model.{field}'):
    models.validate(c)
  c = model_config('decoder_lm', 'cudnn')  # float32 compute
  with pytest.raises(ValueError, match='model.attention'):
    models.validate(c)


def test_splash_length_must_be_lane_aligned():
  with pytest.raises(ValueError, match='multiple of 128, got 200'):
    attention.splash_block_sizes(200)


@pytest.mark.parametrize('causal', [True, False])
def test_splash_interpret_equals_xla_under_a_mesh(causal):
  """The Pallas kernels in interpret mode on CPU, inside shard_map over batch and heads."""
  q, k, v, g = qkv_and_cotangent((2, 128, 2, 128))
  want = value_and_grads(lambda q, k, v: attention.xla(q, k, v, causal=causal), q, k, v, g)
  mcfg = base.get_config().mesh
  mcfg.shape = (2, 2, 2)
  mesh, rules = sharding.make_mesh(mcfg), sharding.logical_rules(mcfg)
  with sharding.activate(mesh, rules):
    got = jax.jit(lambda q, k, v, g: value_and_grads(
        lambda q, k, v: attention.splash(q, k, v, causal=causal, interpret=True),
        q, k, v, g))(q, k, v, g)
  assert_close(got, want, 1e-4)


def test_splash_compiles_for_a_tpu_topology():
  """Forward and backward of a small decoder with attention 'auto' (= splash on TPU), compiled
  for a 4-chip v5e slice with batch and heads sharded; the Pallas kernels are in the program."""
  topology = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
  mcfg = base.get_config().mesh
  mcfg.shape = (1, 2, 2)
  mesh = sharding.make_mesh(mcfg, topology.devices)
  rules = sharding.logical_rules(mcfg)
  c = model_config('decoder_lm', 'auto', dtype='bfloat16', head_dim=128, d_model=256,
                   num_layers=1)
  graphdef, abstract_state = models.abstract_model(c, mesh, rules)
  tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32,
                                sharding=sharding.batch_sharding(mesh, rules))

  def loss(state, tokens):
    return jnp.mean(nnx.merge(graphdef, state)(tokens))

  with sharding.activate(mesh, rules):
    compiled = jax.jit(jax.grad(loss)).lower(abstract_state, tokens).compile()
  hlo = compiled.as_text()
  assert 'splash' in hlo and 'tpu_custom_call' in hlo
  assert mesh.devices.flat[0].platform == 'tpu'
