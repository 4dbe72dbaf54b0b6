"""Tiny configs and a small text corpus for the training / checkpoint / optimizer tests."""

import os
import random

from configs import base

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
  config.model.connection.update(n=2)
  config.data.update(dataset='text_files', text_glob=corpus_glob, data_dir=data_dir, seq_len=32,
                     shuffle_window=16)
  config.optim.update(lr=3e-3, warmup_steps=5)
  config.train.update(batch_size=8, num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                      checkpoint_every=10)
  config.train.update(**train_overrides)
  config.lock()
  return config
