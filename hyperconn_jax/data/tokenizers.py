"""Tokenizers: UTF-8 bytes (default) or a SentencePiece model (data.tokenizer).

Both append an end-of-document id to every encoded document, which the packer uses as the
separator between concatenated documents, and both know how many UTF-8 bytes of text each id stands
for (`token_bytes`), so that losses can be reported in bits per byte whatever the tokenizer.
"""

import abc
import os

import numpy as np


class Tokenizer(abc.ABC):
  """Interface: vocab_size, eos_id, encode, decode, token_bytes / num_bytes."""

  vocab_size: int
  eos_id: int
  # token_bytes[i]: UTF-8 bytes of text that id i stands for (0 for EOS and other control ids).
  token_bytes: np.ndarray

  @abc.abstractmethod
  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the ids (int32 [n]) of one document, ending with eos_id."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Returns the text of ids (EOS and other control ids produce no text)."""

  def num_bytes(self, ids) -> int:
    """Returns the number of UTF-8 bytes of text that ids stand for."""
    return int(self.token_bytes[np.asarray(ids)].sum())


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255; id 0 (NUL) ends a document, NUL bytes in the text are dropped."""

  vocab_size = 256
  eos_id = 0

  def __init__(self):
    self.token_bytes = np.ones(256, np.int64)
    self.token_bytes[self.eos_id] = 0

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    data = data.replace(b'\0', b'') + b'\0'
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f'Byte ids must be in [0, 255]; got range [{ids.min()}, {ids.max()}].')
    return ids[ids != self.eos_id].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file (data.spm_path); documents end with the model's EOS id."""

  def __init__(self, spm_path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(
          "data.tokenizer='sentencepiece' needs the optional sentencepiece package: "
          'pip install sentencepiece') from None
    if not os.path.isfile(spm_path):
      raise ValueError(f'data.spm_path={spm_path!r}: no such SentencePiece model file.')
    self._sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(
          f'data.spm_path={spm_path!r}: the SentencePiece model has no EOS id (it was trained '
          'with eos_id=-1); the packer needs one to separate documents.')
    self.token_bytes = np.array(
        [self._piece_bytes(i) for i in range(self.vocab_size)], np.int64)

  def _piece_bytes(self, i: int) -> int:
    if self._sp.is_control(i) or self._sp.is_unknown(i):
      return 0
    if self._sp.is_byte(i):  # byte-fallback pieces '<0xAB>'
      return 1
    # '\u2581' marks a space in SentencePiece pieces. The space SentencePiece adds in front of each
    # document (add_dummy_prefix) is counted too: at most one byte per document too many.
    return len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.array(self._sp.encode(text) + [self.eos_id], np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids)])


def get_tokenizer(data_config) -> Tokenizer:
  """Returns the tokenizer of data.tokenizer ('bytes' | 'sentencepiece' with data.spm_path)."""
  if data_config.tokenizer == 'bytes':
    return ByteTokenizer()
  if data_config.tokenizer == 'sentencepiece':
    return SentencePieceTokenizer(data_config.spm_path)
  raise ValueError(
      f"data.tokenizer={data_config.tokenizer!r}; expected 'bytes' or 'sentencepiece'.")
