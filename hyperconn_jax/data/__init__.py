"""Data: TFDS builders (stdlib corpus, text files) or any prepared TFDS dataset, read through
tfds data sources and grain (no TensorFlow). Classifiers (model.name='vit') read images instead
(images.py: the embedded 'digits' or a prepared TFDS image dataset); the functions below dispatch.

  get_tokenizer(data_config) -> Tokenizer
  validate(data_config)                     ValueError naming the bad config.data field
  ensure_prepared(config)                   prepares 'stdlib' / 'text_files'; explains the rest
  make_train_iterator(config, *, process_index=0, process_count=1) -> grain DatasetIterator
  make_eval_iterator(config, *, process_index=0, process_count=1, num_batches) -> DatasetIterator

Prepare from the command line with `python -m hyperconn_jax.data.prepare` (see prepare.py).
"""

from hyperconn_jax import models
from hyperconn_jax.data import images
from hyperconn_jax.data import pipeline
from hyperconn_jax.data import sources
from hyperconn_jax.data.checks import validate
from hyperconn_jax.data.tokenizers import get_tokenizer
from hyperconn_jax.data.tokenizers import Tokenizer


def _images(config) -> bool:
  return models.task(config.model) == 'classification'


def ensure_prepared(config) -> None:
  """Prepares the datasets that need no download; explains how to prepare the others."""
  (images.ensure_prepared if _images(config) else sources.ensure_prepared)(config)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """This process's infinite, resumable iterator of training batches (see pipeline / images)."""
  module = images if _images(config) else pipeline
  return module.make_train_iterator(config, process_index=process_index,
                                    process_count=process_count)


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int):
  """A fresh iterator over the eval split (see pipeline / images)."""
  module = images if _images(config) else pipeline
  return module.make_eval_iterator(config, process_index=process_index,
                                   process_count=process_count, num_batches=num_batches)


__all__ = ['Tokenizer', 'ensure_prepared', 'get_tokenizer', 'make_eval_iterator',
           'make_train_iterator', 'validate']
