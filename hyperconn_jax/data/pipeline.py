"""grain pipelines from a data source (token shards or TFDS text) to batches of packed token
sequences. Token shards are read as they are; text is tokenized on the fly (EOS appended), with
data.read_threads threads per process.

Train (infinite, checkpointable):
  the documents are split into data.num_shards shards (contiguous ranges of documents, so that a
  process reading token shards from a bucket touches only the files of its range; 0: one shard per
  process). Each shard: its documents -> shuffle (data.shuffle_seed; every epoch differently) ->
  repeat -> tokens -> concatenate and cut into sequences of seq_len + 1 tokens (_Pack) -> shuffle
  within windows of data.shuffle_window sequences (_WindowShuffle: a permutation per window, seeded
  by the seed, the shard and the window number) -> blocks of train.batch_size / num_shards rows
  -> inputs / targets / weights.
  A global batch is one block of every shard, in shard order; process p owns the contiguous shards
  [p * k, (p + 1) * k), k = num_shards / process_count, so its rows of the global batch are rows
  [p * b, (p + 1) * b), b = train.batch_size / process_count [-> data.worker_count worker
  processes]. Each process reads only its own documents, the processes' batches are disjoint and
  together cover every document of each epoch. With a fixed data.num_shards the global batches are
  the same for every process count that divides it (one process with 8 devices and two with 4
  train on identical batches); with 0 they depend on the process count, but a process never runs
  more than one pipeline. The whole state (document position, packing remainder, shuffle window of
  every shard) is the iterator's get_state(), kept per shard index, and is saved in checkpoints
  with iterator_state.Save / Restore. With a fixed data.num_shards and data.worker_count = 0 a
  run resumes on any process count that divides it (each process takes its shards' states; with
  worker processes the state is grain's, per worker). Train batches never contain padding.

Eval (finite, deterministic, restarts from the beginning on every call):
  documents in stored order -> tokens -> concatenate and split (the last sequence padded) ->
  global batches of B rows (B = train.eval_batch_size, or the training microbatch if 0; the last
  one padded with zero-weight rows) -> rows [process_index * b, (process_index + 1) * b) of each,
  b = B / process_count.
  Eval reads in this process (data.worker_count only applies to training). Unlike train, it splits
  by rows: every process yields the same number of batches and the union of their rows is exactly
  what a single process sees, so eval metrics do not depend on the number of processes. From token
  shards a process reads only the tokens of its own rows (row r is tokens [r * (seq_len + 1),
  (r + 1) * (seq_len + 1)) of the stream, found through the shards' token counts). Text is
  tokenized on the fly, so there each process tokenizes the stream up to the batches it yields
  and keeps its rows (the eval split is small, or limited by num_batches).

Batches are dicts of numpy arrays: 'inputs' int32 [b, seq_len], 'targets' int32 [b, seq_len]
(inputs shifted by one token), 'weights' float32 [b, seq_len] (0 on padding).
"""

from absl import flags
import grain
from grain import experimental as grain_experimental
import numpy as np

from hyperconn_jax.data import checks
from hyperconn_jax.data import sources
from hyperconn_jax.data import token_shards
from hyperconn_jax.data import tokenizers


def _read_options(data_config) -> grain.ReadOptions:
  """data.read_threads threads read (and tokenize) documents ahead of the packer."""
  return grain.ReadOptions(num_threads=data_config.read_threads,
                           prefetch_buffer_size=16 * data_config.read_threads)


class _Tokenize(grain.transforms.Map):
  """Example -> {'tokens': int32 ids of its text, EOS appended}."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, example):
    return {'tokens': self._tokenizer.encode(example[self._text_key])}


class _ToExample(grain.transforms.Map):
  """Packed {'tokens', 'tokens_segment_ids', ...} of [..., seq_len + 1] (a sequence or a block of
  them) -> inputs / targets / weights of [..., seq_len]."""

  def map(self, packed):
    tokens = packed['tokens']
    if 'tokens_segment_ids' in packed:  # Eval: segment id 0 marks the last sequence's padding.
      weights = (packed['tokens_segment_ids'][..., 1:] > 0).astype(np.float32)
    else:  # Train sequences have no padding.
      weights = np.ones(tokens[..., 1:].shape, np.float32)
    return {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:], 'weights': weights}


class _PackIterator(grain.DatasetIterator):
  """Concatenates an infinite stream of documents ({'tokens'}) and cuts it into sequences of
  `length` tokens ({'tokens'}); a document continues in the next sequence where one ends.

  (grain's ConcatThenSplit does the same plus segment ids and padding, which train sequences do
  not need, at several times the cost per sequence.) The state is the parent's state before the
  current document and the offset in it: restoring reads that document again.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent, length: int):
    super().__init__(parent)
    self._length = length
    self._doc_state = None  # The parent's state before self._doc (None: nothing read yet).
    self._doc = None
    self._offset = 0

  def _read_doc(self):
    self._doc_state = self._parent.get_state()
    self._doc = next(self._parent)['tokens']
    self._offset = 0

  def __next__(self):
    pieces, need = [], self._length
    while need:
      if self._doc is None or self._offset == len(self._doc):
        self._read_doc()
      take = min(need, len(self._doc) - self._offset)
      pieces.append(self._doc[self._offset:self._offset + take])
      self._offset += take
      need -= take
    return {'tokens': pieces[0] if len(pieces) == 1 else np.concatenate(pieces)}

  def get_state(self):
    if self._doc is None:
      return {'parent': self._parent.get_state(), 'offset': 0, 'read': False}
    return {'parent': self._doc_state, 'offset': self._offset, 'read': True}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._doc = None
    if state['read']:
      self._read_doc()
      self._offset = state['offset']


class _Pack(grain.IterDataset):
  """See _PackIterator."""

  def __init__(self, parent, length: int):
    super().__init__(parent)
    self._length = length

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._length)

  def __str__(self) -> str:
    return f'_Pack({self._length})'

  @property
  def _element_spec(self):
    return {'tokens': np.zeros(self._length, np.int32)}


class _WindowShuffleIterator(grain.DatasetIterator):
  """Yields the elements of consecutive windows of an infinite parent, each window in a random
  order (numpy permutation of seed + window number). grain's WindowShuffle draws every position
  from its index shuffle (tens of microseconds each, the cost of a whole sequence of the rest of
  the pipeline); one permutation per window costs nothing per element. The state is the parent's
  state at the window's start and the position in it: restoring reads the window again."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent, window_size: int, seed: tuple[int, ...]):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed
    self._window = 0
    self._start = None  # The parent's state before the current window (None: not read yet).
    self._elements = []
    self._order = []
    self._pos = 0

  def _read_window(self):
    self._start = self._parent.get_state()
    self._elements = [next(self._parent) for _ in range(self._window_size)]
    self._order = np.random.default_rng((*self._seed, self._window)).permutation(
        self._window_size)

  def __next__(self):
    if self._start is None:
      self._read_window()
    elif self._pos == self._window_size:
      self._window += 1
      self._pos = 0
      self._read_window()
    element = self._elements[self._order[self._pos]]
    self._pos += 1
    return element

  def get_state(self):
    if self._start is None:
      return {'parent': self._parent.get_state(), 'window': self._window, 'pos': 0, 'read': False}
    return {'parent': self._start, 'window': self._window, 'pos': self._pos, 'read': True}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._window, self._pos = state['window'], state['pos']
    self._start = None
    if state['read']:
      self._read_window()


class _WindowShuffle(grain.IterDataset):
  """See _WindowShuffleIterator."""

  def __init__(self, parent, window_size: int, seed: tuple[int, ...]):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed

  def __iter__(self) -> grain.DatasetIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)

  def __str__(self) -> str:
    return f'_WindowShuffle({self._window_size})'

  @property
  def _element_spec(self):
    return grain_experimental.get_element_spec(self._parent)


class _ShardsIterator(grain.DatasetIterator):
  """Yields one block of rows of each shard, concatenated in shard order.

  Its state holds every shard's state by shard index ({'num_shards', 'shards': {'3': ...}}), so the
  states saved by any number of processes merge into one (merge_states) from which each process
  of a run with another process count takes its own shards.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parents, shard_ids: tuple[int, ...], num_shards: int):
    super().__init__(parents)
    self._shard_ids = shard_ids
    self._num_shards = num_shards

  def __next__(self):
    blocks = [next(parent) for parent in self._parents]
    return {k: np.concatenate([block[k] for block in blocks]) for k in blocks[0]}

  def get_state(self):
    return {'num_shards': self._num_shards,
            'shards': {str(i): p.get_state() for i, p in zip(self._shard_ids, self._parents)}}

  def set_state(self, state):
    if state.get('num_shards') != self._num_shards:
      raise ValueError(
          f"The saved data iterator state is of {state.get('num_shards')} shards, this pipeline "
          f'reads {self._num_shards} (data.num_shards; 0 means one per process): resume with '
          'the process count and data.num_shards that wrote it.')
    for shard, parent in zip(self._shard_ids, self._parents):
      parent.set_state(state['shards'][str(shard)])


class _Shards(grain.IterDataset):
  """This process's shards, batch by batch (see _ShardsIterator)."""

  def __init__(self, parents, shard_ids: tuple[int, ...], num_shards: int):
    super().__init__(parents)
    self._shard_ids = shard_ids
    self._num_shards = num_shards

  def __iter__(self) -> grain.DatasetIterator:
    return _ShardsIterator([parent.__iter__() for parent in self._parents], self._shard_ids,
                           self._num_shards)

  def __str__(self) -> str:
    return f'_Shards({self._shard_ids} of {self._num_shards})'

  @property
  def _element_spec(self):
    return grain_experimental.get_element_spec(self._parents[0])


def merge_states(states: list) -> dict | None:
  """One state holding every shard of the train iterator states saved by several processes, or
  None when they cannot be merged (they are not per shard: data.worker_count > 0)."""
  if not all(isinstance(s, dict) and 'shards' in s for s in states):
    return None
  if len({s['num_shards'] for s in states}) != 1:
    return None
  return {'num_shards': states[0]['num_shards'],
          'shards': {k: v for s in states for k, v in s['shards'].items()}}


def _num_shards(config, process_count: int) -> int:
  """data.num_shards (0: one per process), checked against the processes and the batch."""
  num_shards = config.data.num_shards or process_count
  if num_shards % process_count:
    raise ValueError(
        f'data.num_shards={num_shards} must be a multiple of the {process_count} processes '
        '(each process reads whole shards).')
  if config.train.batch_size % num_shards:
    raise ValueError(
        f'train.batch_size={config.train.batch_size} must be divisible by data.num_shards='
        f'{num_shards} (every global batch takes the same number of rows from each shard).')
  return num_shards


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


def _source(config, split: str):
  """(the split's random-access source (sources.data_source), the tokenizer), after checking that
  the dataset is prepared, not empty, and that its tokenizer fits the model."""
  data_config = config.data
  tokenizer = tokenizers.get_tokenizer(data_config)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the vocabulary of '
        f'data.tokenizer={data_config.tokenizer!r} ({tokenizer.vocab_size}).')
  sources.ensure_prepared(config)
  source = sources.data_source(data_config, split)
  if not len(source):
    raise ValueError(f'Split {split!r} of data.dataset={data_config.dataset!r} is empty.')
  return source, tokenizer


def _documents(config, split: str) -> grain.MapDataset:
  """The split's documents as {'tokens': int32 ids, EOS last} (token shards as they are, text
  tokenized on access), after the checks of _source."""
  data_config = config.data
  source, tokenizer = _source(config, split)
  docs = grain.MapDataset.source(source)
  if data_config.dataset == sources.TOKENS:
    return docs
  example = source[0]
  if data_config.text_key not in example:
    raise ValueError(
        f'data.text_key={data_config.text_key!r} is not a feature of data.dataset='
        f'{data_config.dataset!r}; it has {sorted(example)}.')
  return docs.map(_Tokenize(tokenizer, data_config.text_key))


def _count_tokens(docs: grain.MapDataset, limit: int) -> int:
  """Tokens in docs, counted up to `limit` (reads only as many documents as needed)."""
  total = 0
  for i in range(len(docs)):
    total += len(docs[i]['tokens'])
    if total >= limit:
      break
  return total


def check_eval_split(config) -> None:
  """Raises ValueError when the eval split holds fewer than data.min_eval_tokens tokens (0: one
  global batch, train.batch_size * data.seq_len), naming the fields that change it."""
  data_config = config.data
  needed = data_config.min_eval_tokens or config.train.batch_size * data_config.seq_len
  found = _count_tokens(_documents(config, data_config.eval_split), needed)
  if found < needed:
    meaning = '' if data_config.min_eval_tokens else ': 0 means train.batch_size * data.seq_len'
    raise ValueError(
        f'The eval split {data_config.eval_split!r} of data.dataset={data_config.dataset!r} has '
        f'{found} tokens, fewer than data.min_eval_tokens={data_config.min_eval_tokens} '
        f'({needed} tokens{meaning}); its evaluations would mean little. Hold out more '
        '(data.eval_fraction; for text, a smaller data.piece_chars cuts long documents into more '
        'pieces), use more data, or lower data.min_eval_tokens.')


def _shard_sequences(config, docs: grain.MapDataset, shard: int,
                     num_shards: int) -> grain.IterDataset:
  """The infinite stream of packed, shuffled sequences of one shard of the train documents."""
  data_config = config.data
  length = data_config.seq_len + 1
  docs = docs[shard * len(docs) // num_shards:(shard + 1) * len(docs) // num_shards]
  total = _count_tokens(docs, length)
  if total < length:
    raise ValueError(
        f'Split {data_config.train_split!r} of data.dataset={data_config.dataset!r} (shard '
        f'{shard} of {num_shards}) has only {total} tokens, fewer than one training sequence of '
        f'data.seq_len + 1 = {length} tokens: use a smaller data.seq_len or more data.')
  ds = docs.shuffle(seed=data_config.shuffle_seed).repeat()
  ds = ds.to_iter_dataset(_read_options(data_config))
  ds = _Pack(ds, length)
  if data_config.shuffle_window > 1:
    ds = _WindowShuffle(ds, data_config.shuffle_window, (data_config.shuffle_seed, shard))
  return ds


def make_train_iterator(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Returns this process's infinite iterator of training batches.

  Args:
    config: the full config (reads config.data, config.train.batch_size, config.model.vocab_size).
    process_index: this process, in [0, process_count).
    process_count: number of processes reading data (jax.process_count()).

  Returns:
    A grain DatasetIterator of batches with train.batch_size / process_count rows (this
    process's rows of the global batch, see the module docstring); its get_state() / set_state()
    (or iterator_state.Save / Restore in a checkpoint) save and restore its position
    exactly.

  Raises:
    ValueError: a bad config value, a dataset that is not prepared, too little data, or
      data.num_shards that does not fit the processes or the batch.
  """
  data_config = config.data
  _check_process(process_index, process_count)
  _local_batch_size(config, process_count)  # Checks the batch divides over the processes.
  num_shards = _num_shards(config, process_count)
  docs = _documents(config, data_config.train_split)
  if len(docs) < num_shards:
    raise ValueError(
        f'Split {data_config.train_split!r} of data.dataset={data_config.dataset!r} has '
        f'{len(docs)} documents, fewer than the {num_shards} shards reading it (data.num_shards, '
        f'or the number of processes when it is 0).')
  shards_per_process = num_shards // process_count
  first = process_index * shards_per_process
  shard_ids = tuple(range(first, first + shards_per_process))
  ds = _Shards([_shard_sequences(config, docs, shard, num_shards).batch(
      config.train.batch_size // num_shards, drop_remainder=True).map(_ToExample())
                for shard in shard_ids],
               shard_ids, num_shards)
  if data_config.worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they would
    # be unparsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return iter(ds)


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


def eval_local_batch_size(batch_size: int, process_count: int) -> int:
  """This process's rows of a global eval batch of `batch_size` rows."""
  if batch_size % process_count:
    raise ValueError(
        f'the eval batch (train.eval_batch_size, or the training microbatch if 0) of {batch_size} '
        f'rows is not divisible by the {process_count} processes.')
  return batch_size // process_count


class _EvalRows:
  """Global eval batch j -> this process's rows of it, read from token shards by token offset.

  The same rows as concatenating the split's documents and cutting the stream into rows of
  seq_len + 1 tokens (ConcatThenSplit on the stream): row r is tokens [r * (L + 1),
  (r + 1) * (L + 1)), the last one zero-padded with weight 0; rows past the last are zero rows.
  So a process reads only the tokens of its own rows.
  """

  def __init__(self, source: token_shards.TokenSource, length: int, global_batch: int,
               process_index: int, local_batch: int):
    self._source = source
    self._length = length
    self._global_batch = global_batch
    self._first_row = process_index * local_batch
    self._local_batch = local_batch

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    start = (j * self._global_batch + self._first_row) * self._length
    tokens = self._source.read_tokens(start, start + self._local_batch * self._length)
    padded = np.zeros(self._local_batch * self._length, np.int32)
    padded[:len(tokens)] = tokens
    real = np.arange(len(padded)) < len(tokens)
    return _ToExample().map({'tokens': padded.reshape(self._local_batch, self._length),
                             'tokens_segment_ids': real.reshape(self._local_batch, self._length)})


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int, batch_size: int) -> grain.DatasetIterator:
  """Returns a fresh iterator over the eval split (data.eval_split) from its beginning.

  Args:
    config: the full config.
    process_index: this process, in [0, process_count).
    process_count: number of processes.
    num_batches: at most this many batches; <= 0: the whole split.
    batch_size: rows of a global eval batch (config_lib.eval_batch_size).

  Returns:
    A grain DatasetIterator of batches with batch_size / process_count rows, the same on
    every call; only the last batch may contain padding (weights 0). Every process yields the
    same number of batches. From token shards a process reads only its own rows' tokens; from
    text it tokenizes the stream up to its last batch.

  Raises:
    ValueError: a bad config value or a dataset that is not prepared.
  """
  data_config = config.data
  _check_process(process_index, process_count)
  local_batch = eval_local_batch_size(batch_size, process_count)
  length = data_config.seq_len + 1
  if data_config.dataset == sources.TOKENS:
    source, _ = _source(config, data_config.eval_split)
    rows = -(-source.num_tokens // length)
    count = -(-rows // batch_size)
    if num_batches > 0:
      count = min(count, num_batches)
    ds = grain.MapDataset.range(count).map(
        _EvalRows(source, length, batch_size, process_index, local_batch))
    return iter(ds.to_iter_dataset(_read_options(data_config)))
  ds = _documents(config, data_config.eval_split).to_iter_dataset(_read_options(data_config))
  ds = grain_experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': length})
  ds = ds.map(_ToExample()).batch(
      batch_size, drop_remainder=False,
      batch_fn=_PadAndShard(batch_size, process_index, local_batch))
  if num_batches > 0:
    ds = grain_experimental.LimitIterDataset(ds, count=num_batches)
  return iter(ds)
