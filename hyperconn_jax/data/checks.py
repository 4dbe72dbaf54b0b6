"""Validation of config.data, once, at the entry points (config_lib.validate and the prepare
command), before anything is read, prepared or compiled."""

from hyperconn_jax.data import builders
from hyperconn_jax.data import tokenizers


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
  if not is_int(value) or value < lo or (hi is not None and value > hi):
    bound = f'an int >= {lo}' if hi is None else f'an int in [{lo}, {hi}]'
    raise ValueError(f'data.{name}={value!r}; expected {bound}.')


def _check_name(name: str, value) -> None:
  if not isinstance(value, str) or not value:
    raise ValueError(f'data.{name}={value!r}; expected a non-empty string.')


def _check_number(name: str, value, ok, expected: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ValueError(f'data.{name}={value!r}; expected {expected}.')


def validate(data_config) -> None:
  """Raises ValueError naming the field if config.data has a bad value.

  Checks the dataset / split / feature names, the tokenizer and its model file setting, seq_len,
  the split and minimum eval size, the shuffle parameters, the reader threads, worker and shard
  counts, the image augmentation, that 'tokens' has a data_dir and that 'text_files' matches a file.
  """
  for name in ('dataset', 'train_split', 'eval_split', 'text_key'):
    _check_name(name, data_config[name])
  for name in ('data_dir', 'tokenizer_path'):
    if not isinstance(data_config[name], str):
      raise ValueError(f'data.{name}={data_config[name]!r}; expected a path or "".')
  if data_config.tokenizer not in tokenizers.KINDS:
    raise ValueError(
        f'data.tokenizer={data_config.tokenizer!r}; expected one of {tokenizers.KINDS}.')
  if data_config.tokenizer != 'bytes' and not data_config.tokenizer_path:
    raise ValueError(
        f"data.tokenizer_path='' but data.tokenizer={data_config.tokenizer!r} needs the path of "
        'its model file (a SentencePiece .model / an HF tokenizer.json; a gs:// path works).')
  _check_int('seq_len', data_config.seq_len, 1)
  _check_int('shuffle_seed', data_config.shuffle_seed, 0, 2**32 - 1)
  _check_int('shuffle_window', data_config.shuffle_window, 0)
  _check_int('worker_count', data_config.worker_count, 0)
  _check_int('read_threads', data_config.read_threads, 1)
  _check_int('num_shards', data_config.num_shards, 0)
  _check_int('piece_chars', data_config.piece_chars, 0)
  _check_int('min_eval_tokens', data_config.min_eval_tokens, 0)
  _check_number('eval_fraction', data_config.eval_fraction, lambda f: 0 < f < 1,
                'a number in (0, 1)')
  _check_int('crop_padding', data_config.crop_padding, 0)
  _check_number('crop_min_area', data_config.crop_min_area, lambda a: 0 < a <= 1,
                'a number in (0, 1]')
  _check_number('mixup_alpha', data_config.mixup_alpha, lambda a: a >= 0,
                'a number >= 0 (0: no mixup)')
  if not isinstance(data_config.random_flip, bool):
    raise ValueError(f'data.random_flip={data_config.random_flip!r}; expected True or False.')
  if data_config.dataset == 'tokens' and not data_config.data_dir:
    raise ValueError(
        "data.data_dir='' but data.dataset='tokens' reads the token shards written by "
        '`python prepare.py --out=DIR` from data.data_dir=DIR.')
  if data_config.dataset == 'text_files':
    if not data_config.text_glob:
      raise ValueError(
          "data.text_glob='' but data.dataset='text_files' needs a glob of text files.")
    _, rel_paths = builders.expand_glob(data_config.text_glob)
    if not rel_paths:
      raise ValueError(f'data.text_glob={data_config.text_glob!r} matches 0 files.')
