"""Validation of config.data, before anything is read or prepared."""

from hyperconn_jax.data import builders

TOKENIZERS = ('bytes', 'sentencepiece')


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
  if not is_int(value) or value < lo or (hi is not None and value > hi):
    bound = f'an int >= {lo}' if hi is None else f'an int in [{lo}, {hi}]'
    raise ValueError(f'data.{name}={value!r}; expected {bound}.')


def _check_name(name: str, value) -> None:
  if not isinstance(value, str) or not value:
    raise ValueError(f'data.{name}={value!r}; expected a non-empty string.')


def validate(data_config) -> None:
  """Raises ValueError naming the field if config.data has a bad value.

  Checks the dataset / split / feature names, the tokenizer and its model file, seq_len, the eval
  fraction, the shuffle parameters, the worker and shard counts and, for 'text_files', that
  data.text_glob matches at least two files (train and validation are split by file).
  """
  for name in ('dataset', 'train_split', 'eval_split', 'text_key'):
    _check_name(name, data_config[name])
  if not isinstance(data_config.data_dir, str):
    raise ValueError(f'data.data_dir={data_config.data_dir!r}; expected a path or "".')
  if data_config.tokenizer not in TOKENIZERS:
    raise ValueError(f'data.tokenizer={data_config.tokenizer!r}; expected one of {TOKENIZERS}.')
  if data_config.tokenizer == 'sentencepiece' and not data_config.spm_path:
    raise ValueError(
        "data.spm_path='' but data.tokenizer='sentencepiece' needs the path of a SentencePiece "
        'model file.')
  _check_int('seq_len', data_config.seq_len, 1)
  _check_int('shuffle_seed', data_config.shuffle_seed, 0, 2**32 - 1)
  _check_int('shuffle_window', data_config.shuffle_window, 0)
  _check_int('worker_count', data_config.worker_count, 0)
  _check_int('num_shards', data_config.num_shards, 0)
  fraction = data_config.eval_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ValueError(f'data.eval_fraction={fraction!r}; expected a number in (0, 1).')
  if data_config.dataset == 'text_files':
    if not data_config.text_glob:
      raise ValueError(
          "data.text_glob='' but data.dataset='text_files' needs a glob of text files.")
    _, rel_paths = builders.expand_glob(data_config.text_glob)
    if len(rel_paths) < 2:
      raise ValueError(
          f'data.text_glob={data_config.text_glob!r} matches {len(rel_paths)} file(s); '
          'text_files splits train and validation by file, so it needs at least 2 files.')
