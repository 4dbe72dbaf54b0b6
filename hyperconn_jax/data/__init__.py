"""Data: pre-tokenized token shards ('tokens', written by prepare.py), TFDS builders (stdlib corpus,
text files) or any prepared TFDS dataset, read through grain (no TensorFlow). Classifiers (model.name='vit') read images instead
(images.py: the embedded 'digits' or a prepared TFDS image dataset); the functions below dispatch.

  get_tokenizer(data_config) -> Tokenizer
  validate(data_config)                     ValueError naming the bad config.data field (run once,
                                            by config_lib.validate / prepare)
  ensure_prepared(config)                   prepares 'stdlib' / 'text_files', explains the rest,
                                            checks token shards' tokenizer and the eval split size
  make_train_iterator(config, *, process_index=0, process_count=1) -> grain DatasetIterator
  make_eval_iterator(config, *, process_index=0, process_count=1, num_batches, batch_size=None)
                                            -> DatasetIterator

Prepare (token shards from text / jsonl / parquet files or a TFDS dataset, or a TFDS dataset) from the
command line with `python prepare.py` (hyperconn_jax/data/prepare.py).
"""

from hyperconn_jax import tasks
from hyperconn_jax.data import images
from hyperconn_jax.data import pipeline
from hyperconn_jax.data import sources
from hyperconn_jax.data.checks import validate
from hyperconn_jax.data.tokenizers import get_tokenizer
from hyperconn_jax.data.tokenizers import Tokenizer


def _images(config) -> bool:
  return tasks.of(config.model).reads_images


def ensure_prepared(config) -> None:
  """Prepares the datasets that need no download and explains how to prepare the others; for
  language models also checks token shards' tokenizer and that the eval split holds at least
  data.min_eval_tokens tokens (ValueError naming the fields otherwise)."""
  if _images(config):
    images.ensure_prepared(config)
  else:
    sources.ensure_prepared(config)
    pipeline.check_eval_split(config)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """This process's infinite, resumable iterator of training batches (see pipeline / images)."""
  module = images if _images(config) else pipeline
  return module.make_train_iterator(config, process_index=process_index,
                                    process_count=process_count)


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int, batch_size: int | None = None):
  """A fresh iterator over the eval split (see pipeline / images) in global batches of
  `batch_size` rows (default eval_batch_size(config)); this process's rows only."""
  module = images if _images(config) else pipeline
  return module.make_eval_iterator(
      config, process_index=process_index, process_count=process_count, num_batches=num_batches,
      batch_size=eval_batch_size(config) if batch_size is None else batch_size)


__all__ = ['Tokenizer', 'ensure_prepared', 'get_tokenizer', 'make_eval_iterator',
           'make_train_iterator', 'validate']


def eval_batch_size(config) -> int:
  """Global rows of an eval batch: train.eval_batch_size, or the training microbatch if 0."""
  t = config.train
  return t.eval_batch_size or t.batch_size // config.optim.grad_accum_steps
