"""Tiny configs, a small text corpus and flat parameter access for the tests."""

import os
import random

from flax import nnx
from flax import traverse_util
import pytest

from configs import base
from hyperconn_jax import models

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


def tiny_config(corpus_glob: str, data_dir: str, **train_overrides):
  """A 2-layer, d=32 HC model on the text_files corpus: batch 8, sequences of 32 bytes.

  Args:
    corpus_glob: from write_corpus.
    data_dir: where the text_files dataset is prepared (shared by the tests of a session).
    **train_overrides: config.train fields to change (num_steps, eval_every, ...).
  """
  config = base.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
  config.model.connection.hc.n = 2
  config.data.update(dataset='text_files', text_glob=corpus_glob, data_dir=data_dir, seq_len=32,
                     shuffle_window=16)
  config.optim.update(lr=3e-3, warmup_steps=5)
  config.train.update(batch_size=8, num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                      checkpoint_every=10)
  config.train.update(**train_overrides)
  config.lock()
  return config


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
