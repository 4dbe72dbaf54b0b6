"""Finding, preparing and opening the dataset named by config.data: token shards ('tokens') or a
TFDS dataset.

'tokens' is a directory of pre-tokenized shards written by `prepare` (token_shards.py) at
data.data_dir, any etils.epath location; `ensure_prepared` checks that they were made with the
configured tokenizer.

'stdlib' and 'text_files' need no download, so `ensure_prepared` prepares them on first use. Any
other name is a TFDS dataset ('lm1b', 'c4/en:3.1.0', ...) that the user prepares once as
array_record; if it is missing we raise a ValueError giving the command, before tfds would start a
download of its own. Reading goes through `builder.as_data_source(split)` (what `tfds.data_source`
calls), giving random access to the examples without TensorFlow.

data.data_dir may be a URL (gs://BUCKET/tfds): TFDS reads its metadata through etils.epath and
ArrayRecord reads gs:// itself; 'stdlib' / 'text_files' are prepared locally and copied there.

Two processes may prepare the same dataset at once (several hosts sharing data_dir): TFDS writes
into a temporary directory and renames it into place, which only one of them wins; the loser finds
the dataset prepared and uses it.
"""

import os
import tempfile

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from hyperconn_jax import paths

from hyperconn_jax.data import builders
from hyperconn_jax.data import token_shards
from hyperconn_jax.data import tokenizers

PREPARED_HERE = ('stdlib', 'text_files')
TOKENS = 'tokens'


def resolve_data_dir(data_config) -> str:
  """Returns data.data_dir (a local path made absolute, or a URL such as gs://BUCKET/tfds), or
  TFDS's default (~/tensorflow_datasets) when it is ''."""
  if data_config.data_dir:
    return os.fspath(paths.as_path(data_config.data_dir))
  return os.path.expanduser(tfds.core.constants.DATA_DIR)


def prepare_command(data_config) -> str:
  """Returns the shell command that prepares the dataset of data_config."""
  if data_config.dataset == TOKENS:
    return ("python prepare.py --source='FILES_OR_tfds:NAME' "
            f'--out={data_config.data_dir} --tokenizer={data_config.tokenizer} '
            f'--tokenizer_path={data_config.tokenizer_path}')
  data_dir = resolve_data_dir(data_config)
  if data_config.dataset == 'stdlib':
    return f'python prepare.py --dataset=stdlib --data_dir={data_dir}'
  if data_config.dataset == 'text_files':
    return (f"python prepare.py --dataset=text_files "
            f"--text_glob='{data_config.text_glob}' --data_dir={data_dir}")
  return (f'python prepare.py --dataset={data_config.dataset} '
          f'--data_dir={data_dir}')


def builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the (possibly unprepared) builder of data_config's dataset in its data_dir."""
  data_dir = resolve_data_dir(data_config)
  if data_config.dataset == 'stdlib':
    return builders.PythonStdlib(
        config=builders.stdlib_config(data_config.eval_fraction), data_dir=data_dir,
        file_format='array_record')
  if data_config.dataset == 'text_files':
    return builders.TextFiles(
        config=builders.text_files_config(data_config.text_glob, data_config.eval_fraction,
                                          data_config.piece_chars),
        data_dir=data_dir, file_format='array_record')
  try:
    return tfds.builder(data_config.dataset, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError or an unparsable name
    reason = str(e).splitlines()[0]
    raise ValueError(
        f'data.dataset={data_config.dataset!r} is not prepared in data.data_dir={data_dir!r} and '
        f'tfds cannot build it here ({reason} Without TensorFlow only some TFDS builders can be '
        'imported). Prepare it on a machine with TensorFlow:\n'
        f'  tfds build {data_config.dataset} --data_dir={data_dir} --file_format=array_record\n'
        "and copy the directory here, or use data.dataset='stdlib' / 'text_files'.") from None


def prepare(dataset_builder: tfds.core.DatasetBuilder) -> None:
  """Prepares a builder that needs no download, tolerating a concurrent preparation."""
  if dataset_builder.is_prepared():
    return
  if paths.is_remote(dataset_builder.data_dir_root):
    _prepare_and_upload(dataset_builder)
    return
  logging.info('Preparing %s in %s.', dataset_builder.info.full_name, dataset_builder.data_dir)
  try:
    dataset_builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    # Another process renamed its copy into place first; theirs is as good as ours.
    again = type(dataset_builder)(
        config=dataset_builder.builder_config, data_dir=dataset_builder.data_dir_root,
        file_format='array_record')
    if not again.is_prepared():
      raise


def _prepare_and_upload(dataset_builder: tfds.core.DatasetBuilder) -> None:
  """Prepares into a local temporary directory and copies the files to the bucket: the
  ArrayRecord writer only writes local files (its reader reads gs:// directly). The metadata
  files (dataset_info.json, ...) go last, so a reader never sees a half-copied dataset as
  prepared (tfds.is_prepared looks for them)."""
  with tempfile.TemporaryDirectory() as local_root:
    local = type(dataset_builder)(config=dataset_builder.builder_config, data_dir=local_root,
                                  file_format='array_record')
    prepare(local)
    source, target = epath.Path(local.data_dir), epath.Path(dataset_builder.data_dir)
    logging.info('Copying the prepared %s to %s.', local.info.full_name, target)
    paths.copy_tree(source, target, last=lambda p: p.suffix == '.json')


def ensure_prepared(config) -> None:
  """Makes sure config.data's dataset is prepared in its data_dir.

  Prepares 'stdlib' and 'text_files' if needed (seconds; no download).

  Raises:
    ValueError: a bad config.data value, any other dataset that is not prepared (the message gives
      the command that prepares it), or one prepared in a format tfds.data_source cannot read.
  """
  data_config = config.data
  if data_config.dataset == TOKENS:
    token_meta(data_config, tokenizers.get_tokenizer(data_config))
    return
  data_dir = resolve_data_dir(data_config)
  dataset_builder = builder(data_config)
  if data_config.dataset in PREPARED_HERE:
    prepare(dataset_builder)
    return
  if not dataset_builder.is_prepared():
    raise ValueError(
        f'data.dataset={data_config.dataset!r} is not prepared in data.data_dir={data_dir!r}. '
        f'Prepare it once with:\n  {prepare_command(data_config)}\n'
        '(the same as tfds.builder(NAME, data_dir=DIR).download_and_prepare('
        "file_format='array_record')). TFDS datasets that need TensorFlow or apache-beam to "
        'generate can be prepared where those are installed, with\n'
        f'  tfds build {data_config.dataset} --data_dir={data_dir} --file_format=array_record\n'
        'and the directory copied here.')
  file_format = dataset_builder.info.file_format
  if file_format is not None and file_format.value != 'array_record':
    raise ValueError(
        f'data.dataset={data_config.dataset!r} in {dataset_builder.data_dir} is prepared as '
        f'{file_format.value}, but reading without TensorFlow needs array_record. Prepare it '
        f'again with:\n  {prepare_command(data_config)}')


def token_meta(data_config, tokenizer: tokenizers.Tokenizer) -> dict:
  """meta.json of the token shards at data.data_dir, checked against the configured tokenizer.

  Raises:
    ValueError: no finished shards there, or shards made with another tokenizer.
  """
  meta = token_shards.read_meta(data_config.data_dir)
  if meta is None or meta.get('format') != token_shards.FORMAT:
    raise ValueError(
        f"data.dataset='tokens' but data.data_dir={data_config.data_dir!r} holds no finished token "
        f'shards ({token_shards.META} of format {token_shards.FORMAT!r}). Prepare them with:\n'
        f'  {prepare_command(data_config)}')
  if meta['tokenizer'] != tokenizer.identity:
    raise ValueError(
        f'The token shards in data.data_dir={data_config.data_dir!r} were made with the tokenizer '
        f"{meta['tokenizer']}, but data.tokenizer={data_config.tokenizer!r} / "
        f'data.tokenizer_path={data_config.tokenizer_path!r} is {tokenizer.identity}. Train with '
        'the tokenizer the shards were made with, or prepare them again with this one.')
  return meta


def data_source(data_config, split: str):
  """Returns the random-access source of one split of an already prepared dataset.

  Args:
    data_config: config.data.
    split: a split name of the dataset (data.train_split / data.eval_split).

  Returns:
    A sequence of examples (dicts of numpy values / bytes), from `builder.as_data_source(split)`;
    for 'tokens' a TokenSource ({'tokens': int32 ids}).

  Raises:
    ValueError: the split does not exist or the prepared files cannot be read.
  """
  if data_config.dataset == TOKENS:
    meta = token_shards.read_meta(data_config.data_dir)
    if split not in meta['splits']:
      raise ValueError(
          f'Split {split!r} (data.train_split / data.eval_split) not in the token shards in '
          f"data.data_dir={data_config.data_dir!r}; they have {sorted(meta['splits'])}.")
    return token_shards.TokenSource(data_config.data_dir, meta, split)
  data_dir = resolve_data_dir(data_config)
  dataset_builder = builder(data_config)
  if not dataset_builder.is_prepared():
    raise ValueError(
        f'data.dataset={data_config.dataset!r} is not prepared in {data_dir}; run '
        f'ensure_prepared(config) or:\n  {prepare_command(data_config)}')
  splits = sorted(dataset_builder.info.splits.keys())
  if split not in dataset_builder.info.splits:
    raise ValueError(
        f'Split {split!r} (data.train_split / data.eval_split) not in data.dataset='
        f'{data_config.dataset!r}; it has {splits}.')
  try:
    source = dataset_builder.as_data_source(split=split)
    if len(source):
      source[0]
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Cannot read split {split!r} of data.dataset={data_config.dataset!r} prepared in '
        f'{dataset_builder.data_dir} ({type(e).__name__}: {e}). The files look corrupted: delete '
        f'that directory and prepare it again with:\n  {prepare_command(data_config)}') from e
  return source
