"""Pre-tokenized shards: what `prepare --tokenizer=...` writes and training reads (data.dataset=
'tokens', data.data_dir = the shards' directory, any etils.epath location).

Format (fixed-width token files with an index, chosen over ArrayRecord of token arrays: reading a
document is one slice of a memory map with no record decoding, the index is a few bytes per
document, and it is the layout of OLMo's own pre-tokenized corpora, numpy token memmaps):

  DIR/meta.json                 FORMAT, the tokenizer's identity (kind, sha256 of its model file,
                                vocab_size, eos_id), the token dtype, how the split was made, and
                                per split the list of shards with their document and token counts
  DIR/<split>-<unit>.tokens     the documents' ids back to back (EOS-terminated), little-endian
                                uint16 when the vocabulary fits, else uint32
  DIR/<split>-<unit>.index      int64 end offset (in tokens) of every document, raw

A unit is one piece of work of `prepare` (one source file, or a range of a TFDS split); its
`done-<unit>.json` marker is written after its shards, so an interrupted `prepare` redoes only
the units without one. meta.json is written last, from the markers in unit order: the result does
not depend on the number of workers or on interruptions.
"""

import bisect
import json
import os
import threading

from etils import epath
import numpy as np

FORMAT = 'hyperconn_jax.tokens/1'
META = 'meta.json'


def dtype_for(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 2**16 else 'uint32'


def shard_name(split: str, unit: int) -> str:
  return f'{split}-{unit:05d}'


def done_name(unit: int) -> str:
  return f'done-{unit:05d}.json'


class ShardWriter:
  """Accumulates the documents of one shard and writes its .tokens and .index files."""

  def __init__(self, directory: epath.Path, name: str, dtype: str):
    self._path = directory / name
    self._dtype = np.dtype(dtype).newbyteorder('<')
    self._docs = []
    self.num_tokens = 0

  def add(self, tokens: np.ndarray) -> None:
    self._docs.append(tokens.astype(self._dtype))
    self.num_tokens += len(tokens)

  @property
  def num_docs(self) -> int:
    return len(self._docs)

  def write(self) -> dict:
    """Writes the files; returns the shard's entry of meta.json."""
    ends = np.cumsum([len(d) for d in self._docs], dtype=np.int64).astype('<i8')
    tokens = np.concatenate(self._docs) if self._docs else np.zeros(0, self._dtype)
    self._path.with_suffix('.tokens').write_bytes(tokens.tobytes())
    self._path.with_suffix('.index').write_bytes(ends.tobytes())
    return {'name': self._path.name, 'num_docs': self.num_docs, 'num_tokens': self.num_tokens}


def read_meta(directory) -> dict | None:
  """meta.json of a shard directory, or None when there is none (not prepared, or unfinished)."""
  path = epath.Path(directory) / META
  return json.loads(path.read_text()) if path.exists() else None


class _Shard:
  """One shard's documents, opened on first use: a memory map when local; in a bucket the file is
  read whole once (one request, not one per document; a process reads a contiguous range of the
  documents, so it loads only the shards of its range)."""

  def __init__(self, path: epath.Path, dtype: str):
    self._path = path
    self._dtype = np.dtype(dtype).newbyteorder('<')
    self._lock = threading.Lock()
    self._ends = None
    self._tokens = None

  def _open(self):
    with self._lock:
      if self._tokens is not None:
        return
      ends = np.frombuffer(self._path.with_suffix('.index').read_bytes(), '<i8')
      tokens = self._path.with_suffix('.tokens')
      if not ends.size:
        self._tokens = np.zeros(0, self._dtype)
      elif os.path.isabs(str(tokens)):  # Local: the OS pages in what is read.
        # A plain array over the map: slices of a np.memmap are memmaps, slower to handle.
        self._tokens = np.asarray(np.memmap(str(tokens), self._dtype, mode='r'))
      else:
        self._tokens = np.frombuffer(tokens.read_bytes(), self._dtype)
      if len(self._tokens) != (ends[-1] if ends.size else 0):
        raise ValueError(f'{tokens} holds {len(self._tokens)} tokens but its index says '
                         f'{ends[-1] if ends.size else 0}: the shard is damaged; prepare it again.')
      self._ends = ends

  def __getitem__(self, i: int) -> np.ndarray:
    if self._tokens is None:
      self._open()
    start = int(self._ends[i - 1]) if i else 0
    return self._tokens[start:int(self._ends[i])].astype(np.int32)

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the shard (int32): a slice when the shard is already open, else
    one seek and read of the .tokens file (a ranged request in a bucket, not the whole object)."""
    if self._tokens is not None:
      return self._tokens[start:stop].astype(np.int32)
    tokens = self._path.with_suffix('.tokens')
    with tokens.open('rb') as f:
      f.seek(start * self._dtype.itemsize)
      raw = f.read((stop - start) * self._dtype.itemsize)
    if len(raw) != (stop - start) * self._dtype.itemsize:
      raise ValueError(f'{tokens} ends before token {stop}, which its meta.json counts: the shard '
                       'is damaged; prepare it again.')
    return np.frombuffer(raw, self._dtype).astype(np.int32)

  def __getstate__(self):  # Worker processes open their own.
    return {'_path': self._path, '_dtype': self._dtype}

  def __setstate__(self, state):
    self.__init__(state['_path'], state['_dtype'])


class TokenSource:
  """Random access to the documents of one split: source[i] = {'tokens': int32 ids, EOS last}."""

  def __init__(self, directory, meta: dict, split: str):
    directory = epath.Path(directory)
    shards = [s for s in meta['splits'][split] if s['num_docs']]
    self._shards = [_Shard(directory / s['name'], meta['dtype']) for s in shards]
    self._starts = list(np.cumsum([0] + [s['num_docs'] for s in shards[:-1]]))
    self._len = sum(s['num_docs'] for s in shards)
    # Where each shard's tokens start in the split's stream (its documents back to back).
    self._token_starts = list(np.cumsum([0] + [s['num_tokens'] for s in shards], dtype=np.int64))
    self.num_tokens = int(self._token_starts.pop())

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._len:
      raise IndexError(i)
    k = bisect.bisect_right(self._starts, i) - 1
    return {'tokens': self._shards[k][i - self._starts[k]]}

  def read_tokens(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split's stream (every document, EOS-terminated, in order), as
    int32, reading only those tokens from the shards that hold them."""
    start, stop = max(start, 0), min(stop, self.num_tokens)
    if start >= stop:
      return np.zeros(0, np.int32)
    first = bisect.bisect_right(self._token_starts, start) - 1
    last = bisect.bisect_right(self._token_starts, stop - 1) - 1
    pieces = []
    for k in range(first, last + 1):
      offset = self._token_starts[k]
      end = self._token_starts[k + 1] if k + 1 < len(self._shards) else self.num_tokens
      pieces.append(self._shards[k].read(max(start, offset) - offset, min(stop, end) - offset))
    return np.concatenate(pieces)

  def __repr__(self) -> str:
    return f'TokenSource({len(self._shards)} shards, {self._len} documents)'
