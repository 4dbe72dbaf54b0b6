"""Tokenizers: UTF-8 bytes (default), a SentencePiece model or an HF `tokenizers` file
(data.tokenizer, with the model file in data.tokenizer_path: any etils.epath path, gs:// too).

All append an end-of-document id to every encoded document, which the packer uses as the
separator between concatenated documents, and all know how many UTF-8 bytes of text each id stands
for (`token_bytes`), so that losses can be reported in bits per byte whatever the tokenizer.
`identity` names the tokenizer and a hash of its model file: token shards record it, and training
refuses shards made with another tokenizer.
"""

import abc
import functools
import hashlib

from etils import epath
import numpy as np

KINDS = ('bytes', 'sentencepiece', 'huggingface')
# End-of-document tokens looked up (in this order) in an HF tokenizer's special tokens.
HF_EOS_TOKENS = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '[SEP]')


class Tokenizer(abc.ABC):
  """Interface: vocab_size, eos_id, identity, encode, encode_batch, decode, token_bytes."""

  vocab_size: int
  eos_id: int
  # {'kind', 'sha256' of the model file ('' for bytes), 'vocab_size', 'eos_id'}.
  identity: dict
  # token_bytes[i]: UTF-8 bytes of text that id i stands for (0 for EOS and other control ids).
  token_bytes: np.ndarray

  @abc.abstractmethod
  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the ids (int32 [n]) of one document, ending with eos_id."""

  def encode_batch(self, texts) -> list[np.ndarray]:
    """encode() of each text (tokenizers that can, encode a batch in parallel)."""
    return [self.encode(t) for t in texts]

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Returns the text of ids (EOS and other control ids produce no text)."""

  def num_bytes(self, ids) -> int:
    """Returns the number of UTF-8 bytes of text that ids stand for."""
    return int(self.token_bytes[np.asarray(ids)].sum())


def _as_str(text: str | bytes) -> str:
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255; id 0 (NUL) ends a document, NUL bytes in the text are dropped."""

  vocab_size = 256
  eos_id = 0
  identity = {'kind': 'bytes', 'sha256': '', 'vocab_size': 256, 'eos_id': 0}

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


def _read_model(kind: str, path: str) -> bytes:
  """The bytes of the model file data.tokenizer_path (local or in a bucket)."""
  if not path:
    raise ValueError(f"data.tokenizer_path='' but data.tokenizer={kind!r} needs a model file.")
  model = epath.Path(path)
  if not model.is_file():
    raise ValueError(f'data.tokenizer_path={path!r}: no such {kind} model file.')
  return model.read_bytes()


def _identity(kind: str, model: bytes, vocab_size: int, eos_id: int) -> dict:
  return {'kind': kind, 'sha256': hashlib.sha256(model).hexdigest(), 'vocab_size': vocab_size,
          'eos_id': eos_id}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file; documents end with the model's EOS id."""

  def __init__(self, path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top  (optional: this tokenizer only)
    except ImportError:
      raise ValueError(
          "data.tokenizer='sentencepiece' needs the optional sentencepiece package: "
          'pip install sentencepiece') from None
    model = _read_model('sentencepiece', path)
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(
          f'data.tokenizer_path={path!r}: the SentencePiece model has no EOS id (it was trained '
          'with eos_id=-1); the packer needs one to separate documents.')
    self.identity = _identity('sentencepiece', model, self.vocab_size, self.eos_id)
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
    return np.array(self._sp.encode(_as_str(text)) + [self.eos_id], np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids)])


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet (a printable character per byte) -> the byte."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
               list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class HuggingFaceTokenizer(Tokenizer):
  """An HF `tokenizers` file (tokenizer.json, e.g. GPT-NeoX-20B's); documents end with the first of
  HF_EOS_TOKENS among its special tokens. No special tokens are added around documents."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top  (only for this tokenizer)
    model = _read_model('huggingface', path)
    try:
      self._tok = tokenizers.Tokenizer.from_str(model.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'data.tokenizer_path={path!r} is not an HF tokenizer.json: {e}') from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    eos = next((t for t in HF_EOS_TOKENS if t in special), None)
    if eos is None:
      raise ValueError(
          f'data.tokenizer_path={path!r}: none of the end-of-document tokens {HF_EOS_TOKENS} is '
          f'a special token of this tokenizer (it has {sorted(special)}); the packer needs one.')
    self.eos_id = special[eos]
    self.identity = _identity('huggingface', model, self.vocab_size, self.eos_id)
    byte_level = 'ByteLevel' in str(self._tok.decoder)
    decoder = _byte_level_decoder()
    sizes = []
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special.values():
        sizes.append(0)
      elif byte_level and all(c in decoder for c in piece):
        sizes.append(len(piece))  # One character of the byte-level alphabet per byte.
      else:
        sizes.append(len(self._tok.decode([i], skip_special_tokens=False).encode('utf-8')))
    self.token_bytes = np.array(sizes, np.int64)

  def encode(self, text: str | bytes) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts) -> list[np.ndarray]:
    encodings = self._tok.encode_batch([_as_str(t) for t in texts], add_special_tokens=False)
    return [np.array(e.ids + [self.eos_id], np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids)])


def get_tokenizer(data_config) -> Tokenizer:
  """Returns the tokenizer of data.tokenizer (KINDS), with data.tokenizer_path for a model file."""
  if data_config.tokenizer == 'bytes':
    return ByteTokenizer()
  if data_config.tokenizer == 'sentencepiece':
    return SentencePieceTokenizer(data_config.tokenizer_path)
  if data_config.tokenizer == 'huggingface':
    return HuggingFaceTokenizer(data_config.tokenizer_path)
  raise ValueError(f'data.tokenizer={data_config.tokenizer!r}; expected one of {KINDS}.')
