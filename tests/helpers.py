"""Tiny configs, a small text corpus and flat parameter access for the tests."""

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util
import pytest

from configs import base
from hyperconn_jax import connections, models

_WORDS = ('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'hyper', 'connection',
          'stream', 'residual', 'layer', 'norm', 'matrix', 'width', 'depth', 'token')


def write_corpus(directory: str, num_docs: int = 120) -> str:
  """Writes `num_docs` small deterministic text files; returns their glob."""
  os.makedirs(directory, exist_ok=True)
  rng = random.Random(0)
  for i in range(num_docs):
    sentences = [' '.join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9))) + '.'
                 for _ in range(rng.randint(3, 8))]
    with open(os.path.join(directory, f'doc{i:04d}.txt'), 'w') as f:
      f.write(' '.join(sentences) + '\n')
  return os.path.join(directory, '*.txt')


TINY_VOCAB = 64

# config.model.connection as config.json held it before the per-kind sub-configs (commit
# dc2bf9f), here for an mHC x2 run with the learned head.
OLD_CONNECTION = {
    'kind': 'mhc', 'n': 2, 'm': 4, 'dynamic': True, 'tanh': True, 'dynamic_norm': 'layernorm',
    'dynamic_norm_affine': False, 'scale': True, 'alpha_scale_init': 0.01, 'beta_scale_init': 0.01,
    'train_width': True, 'train_beta': True, 'index_base': 1, 'out_proj_sqrt_n': 'none',
    'sinkhorn_iters': 20, 'sinkhorn_eps': 1e-06, 'post_mult': 2.0, 'gate_init': 0.01,
    'res_init': 'identity', 'res_offdiag_logit': -4.0, 'pre_init': 'home', 'pre_off_home': 0.01,
    'mappings': ['pre', 'post', 'res'], 'reduce': 'head'}


def tiny_model(kind: str = 'residual_prenorm', **connection):
  """The tests' one tiny model (config.model): vocab 64, d 32, 2 layers of 2 heads x 16, MLP 64,
  fp32, with connection `kind` and its options (model.connection.<kind>) overridden."""
  c = base.get_config().model
  c.update(vocab_size=TINY_VOCAB, d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
  c.connection.kind = kind
  c.connection[kind].update(connection)
  return c


def tiny_config(corpus_glob: str, data_dir: str, **train_overrides):
  """A 2-layer, d=32 HC model on the text_files corpus: batch 8, sequences of 32 bytes.

  Args:
    corpus_glob: from write_corpus.
    data_dir: where the text_files dataset is prepared (shared by the tests of a session).
    **train_overrides: config.train fields to change (num_steps, eval_every, ...).
  """
  config = base.get_config()
  config.model = tiny_model('hc', n=2)
  config.model.vocab_size = 256  # The byte tokenizer's.
  config.data.update(dataset='text_files', text_glob=corpus_glob, data_dir=data_dir, seq_len=32,
                     shuffle_window=16)
  config.optim.update(lr=3e-3, warmup_steps=5)
  config.train.update(batch_size=8, num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                      checkpoint_every=10)
  config.train.update(**train_overrides)
  config.lock()
  return config


def connection_config(kind, **options):
  """config.model.connection of `kind` with its options (model.connection.<kind>) overridden."""
  config = base.connection_config()
  config.kind = kind
  config[kind].update(options)
  return config


def build_connection_modules(config, dim, sublayer_index=0, norm_eps=1e-5):
  """(streams, connection) of config.model.connection for width `dim`, outside any mesh."""
  with nnx.use_eager_sharding(False):
    streams = connections.build_streams(config, dim=dim, norm_eps=norm_eps, rngs=nnx.Rngs(0))
    connection = connections.build_connection(config, dim=dim, sublayer_index=sublayer_index,
                                              norm_kind='layernorm', norm_eps=norm_eps,
                                              rngs=nnx.Rngs(0))
  return streams, connection


def randomize(module, seed, scale=0.5):
  """Sets every variable (static and dynamic parts, scales, gates, biases) to random values."""
  state = nnx.state(module, nnx.Variable)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype) for leaf in leaves]
  nnx.update(module, jax.tree.unflatten(treedef, new))


def flat(model_or_state) -> dict:
  """{path tuple: array} of a model's (or an nnx.State's) variables."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def set_flat(model, flat_params: dict) -> None:
  """Sets a model's variables from a `flat` dict."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat_params))
  nnx.update(model, state)


def assert_validate_names_field(model_config, section: str, field: str, value) -> None:
  """Setting model.<section>.<field> to a bad value makes models.validate name that field."""
  with model_config[section].ignore_type():
    model_config[section][field] = value
  with pytest.raises(ValueError, match=f'model.{section}.{field}'):
    models.validate(model_config)
