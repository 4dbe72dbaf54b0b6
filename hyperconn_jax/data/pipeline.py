"""grain pipelines from a TFDS data source to batches of packed token sequences.

Train (infinite, checkpointable):
  documents of this process (source[process_index::process_count]) -> shuffle (data.shuffle_seed;
  every epoch differently) -> repeat -> tokenize (EOS appended) -> concatenate and split into
  sequences of seq_len + 1 tokens (grain's ConcatThenSplit) -> shuffle within windows of
  data.shuffle_window sequences -> inputs / targets / weights -> batches of
  train.batch_size / process_count rows [-> data.worker_count worker processes].
  Each process reads only its own documents, so the processes' batches are disjoint and together
  cover every document of each epoch; the whole state (document position, packing remainder,
  shuffle window) is the iterator's get_state() and is saved in checkpoints with
  grain.checkpoint.CheckpointSave / CheckpointRestore. Train batches never contain padding.

Eval (finite, deterministic, restarts from the beginning on every call):
  documents in stored order -> tokenize -> concatenate and split (the last sequence padded) ->
  global batches of train.batch_size rows (the last one padded with zero-weight rows) -> rows
  [process_index * b, (process_index + 1) * b) of each, b = train.batch_size / process_count.
  Eval reads in this process (data.worker_count only applies to training). Unlike train, it splits
  by rows: every process yields the same number of batches and the union of their rows is exactly
  what a single process sees, so eval metrics do not depend on the number of processes. Each
  process tokenizes the eval stream up to the batches it yields (the eval split is small, or
  limited by num_batches).

Batches are dicts of numpy arrays: 'inputs' int32 [b, seq_len], 'targets' int32 [b, seq_len]
(inputs shifted by one token), 'weights' float32 [b, seq_len] (0 on padding).
"""

from absl import flags
import grain
from grain import experimental as grain_experimental
import numpy as np

from hyperconn_jax.data import checks
from hyperconn_jax.data import sources
from hyperconn_jax.data import tokenizers

# Threads reading and tokenizing documents ahead of the packer, per process, and how many
# documents they may hold.
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=128)


class _Tokenize(grain.transforms.Map):
  """Example -> {'tokens': int32 ids of its text, EOS appended}."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, example):
    return {'tokens': self._tokenizer.encode(example[self._text_key])}


class _ToExample(grain.transforms.Map):
  """Packed {'tokens', 'tokens_segment_ids', ...} of seq_len + 1 -> inputs / targets / weights."""

  def map(self, packed):
    tokens = packed['tokens']
    # Segment id 0 marks the padding of the last eval sequence.
    return {'inputs': tokens[:-1], 'targets': tokens[1:],
            'weights': (packed['tokens_segment_ids'][1:] > 0).astype(np.float32)}


def _slices_as_tuples(state):
  """Returns state with every ConcatThenSplit 'remainder_slices' entry as a tuple again.

  grain 0.2.18's ConcatThenSplit compares these slices with the tuple (-1, -1), but checkpoints
  store the state as JSON, which turns tuples into lists; restored as lists, a state without
  remainder reads as having an empty one and the next document is lost.
  """
  if isinstance(state, dict):
    return {k: ({f: tuple(sl) for f, sl in v.items()} if k == 'remainder_slices'
                else _slices_as_tuples(v)) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return type(state)(_slices_as_tuples(v) for v in state)
  return state


class _JsonStateIterator(grain.DatasetIterator):
  """Passes elements through; set_state accepts a state that went through JSON."""

  _MUTATES_ELEMENT_SPEC = False

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_slices_as_tuples(state))


class _JsonState(grain.IterDataset):
  """The pipeline whose iterator restores checkpointed (JSON) states; see _slices_as_tuples."""

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return '_JsonState'

  @property
  def _element_spec(self):
    return grain_experimental.get_element_spec(self._parent)


def _local_batch_size(config, process_count: int) -> int:
  batch_size = config.train.batch_size
  if not checks.is_int(batch_size) or batch_size < 1:
    raise ValueError(f'train.batch_size={batch_size!r}; expected an int >= 1.')
  if batch_size % process_count:
    raise ValueError(
        f'train.batch_size={batch_size} (the global batch) is not divisible by the '
        f'{process_count} processes.')
  return batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')


def _open_split(config, split: str, tokenizer: tokenizers.Tokenizer):
  """Validates config, prepares the dataset if needed and returns the split's source."""
  data_config = config.data
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the vocabulary of '
        f'data.tokenizer={data_config.tokenizer!r} ({tokenizer.vocab_size}).')
  sources.ensure_prepared(config)
  source = sources.data_source(data_config, split)
  if not len(source):
    raise ValueError(f'Split {split!r} of data.dataset={data_config.dataset!r} is empty.')
  example = source[0]
  if data_config.text_key not in example:
    raise ValueError(
        f'data.text_key={data_config.text_key!r} is not a feature of data.dataset='
        f'{data_config.dataset!r}; it has {sorted(example)}.')
  return source


def _check_fills_a_sequence(docs: grain.MapDataset, tokenize: _Tokenize, length: int,
                            what: str) -> None:
  """Raises ValueError if docs hold fewer than `length` tokens (reads only as many as needed)."""
  total = 0
  for i in range(len(docs)):
    total += len(tokenize.map(docs[i])['tokens'])
    if total >= length:
      return
  raise ValueError(
      f'{what} has only {total} tokens, fewer than one training sequence of data.seq_len + 1 = '
      f'{length} tokens: use a smaller data.seq_len or more data.')


def make_train_iterator(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Returns this process's infinite iterator of training batches.

  Args:
    config: the full config (reads config.data, config.train.batch_size, config.model.vocab_size).
    process_index: this process, in [0, process_count).
    process_count: number of processes reading data (jax.process_count()).

  Returns:
    A grain DatasetIterator of batches with train.batch_size / process_count rows; its
    get_state() / set_state() (or grain.checkpoint.CheckpointSave / CheckpointRestore) save and
    restore its position exactly.

  Raises:
    ValueError: a bad config value, a dataset that is not prepared, or too little data.
  """
  data_config = config.data
  checks.validate(data_config)
  _check_process(process_index, process_count)
  local_batch = _local_batch_size(config, process_count)
  tokenizer = tokenizers.get_tokenizer(data_config)
  source = _open_split(config, data_config.train_split, tokenizer)
  if len(source) < process_count:
    raise ValueError(
        f'Split {data_config.train_split!r} of data.dataset={data_config.dataset!r} has '
        f'{len(source)} documents, fewer than the {process_count} processes reading it.')
  tokenize = _Tokenize(tokenizer, data_config.text_key)
  length = data_config.seq_len + 1
  docs = grain.MapDataset.source(source)[process_index::process_count]
  _check_fills_a_sequence(
      docs, tokenize, length,
      f'Split {data_config.train_split!r} of data.dataset={data_config.dataset!r} (process '
      f'{process_index} of {process_count})')
  ds = docs.shuffle(seed=data_config.shuffle_seed).repeat().map(tokenize)
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  ds = grain_experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': length})
  if data_config.shuffle_window > 1:
    ds = grain_experimental.WindowShuffleIterDataset(
        ds, window_size=data_config.shuffle_window, seed=data_config.shuffle_seed)
  ds = ds.map(_ToExample()).batch(local_batch, drop_remainder=True)
  if data_config.worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they would
    # be unparsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return iter(_JsonState(ds))


class _PadAndShard:
  """Stacks up to a global batch of examples, pads it with zero-weight rows, keeps our rows."""

  def __init__(self, global_batch: int, process_index: int, local_batch: int):
    self._global_batch = global_batch
    self._rows = slice(process_index * local_batch, (process_index + 1) * local_batch)

  def __call__(self, examples):
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    missing = self._global_batch - len(examples)
    if missing:
      batch = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    return {k: v[self._rows] for k, v in batch.items()}


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int) -> grain.DatasetIterator:
  """Returns a fresh iterator over the eval split (data.eval_split) from its beginning.

  Args:
    config: the full config.
    process_index: this process, in [0, process_count).
    process_count: number of processes.
    num_batches: at most this many batches; <= 0: the whole split.

  Returns:
    A grain DatasetIterator of batches with train.batch_size / process_count rows, the same on
    every call; only the last batch may contain padding (weights 0). Every process yields the
    same number of batches.

  Raises:
    ValueError: a bad config value or a dataset that is not prepared.
  """
  data_config = config.data
  checks.validate(data_config)
  _check_process(process_index, process_count)
  local_batch = _local_batch_size(config, process_count)
  tokenizer = tokenizers.get_tokenizer(data_config)
  source = _open_split(config, data_config.eval_split, tokenizer)
  ds = grain.MapDataset.source(source).map(_Tokenize(tokenizer, data_config.text_key))
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  ds = grain_experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': data_config.seq_len + 1})
  ds = ds.map(_ToExample()).batch(
      config.train.batch_size, drop_remainder=False,
      batch_fn=_PadAndShard(config.train.batch_size, process_index, local_batch))
  if num_batches > 0:
    ds = grain_experimental.LimitIterDataset(ds, count=num_batches)
  return iter(ds)
