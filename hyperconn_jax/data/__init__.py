"""Data: TFDS builders (stdlib corpus, text files) or any prepared TFDS dataset, read through
tfds data sources and grain (no TensorFlow).

  get_tokenizer(data_config) -> Tokenizer
  validate(data_config)                     ValueError naming the bad config.data field
  ensure_prepared(config)                   prepares 'stdlib' / 'text_files'; explains the rest
  make_train_iterator(config, *, process_index=0, process_count=1) -> grain DatasetIterator
  make_eval_iterator(config, *, process_index=0, process_count=1, num_batches) -> DatasetIterator

Prepare from the command line with `python -m hyperconn_jax.data.prepare` (see prepare.py).
"""

from hyperconn_jax.data.checks import validate
from hyperconn_jax.data.pipeline import make_eval_iterator
from hyperconn_jax.data.pipeline import make_train_iterator
from hyperconn_jax.data.sources import ensure_prepared
from hyperconn_jax.data.tokenizers import get_tokenizer
from hyperconn_jax.data.tokenizers import Tokenizer

__all__ = ['Tokenizer', 'ensure_prepared', 'get_tokenizer', 'make_eval_iterator',
           'make_train_iterator', 'validate']
