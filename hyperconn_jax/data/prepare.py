"""The data preparation command line (prepare.py at the repository root): token shards of any
corpus (token_prepare.py), or a TFDS dataset as array_record (sources.py, images.py).

  main(argv, defaults)   parses prepare.py's flags and prepares what they ask for; the flags'
                         defaults are `defaults.data` (configs/base.py's, passed in by prepare.py:
                         library code does not import configs/)
"""

import argparse
import copy
import os
import time

import ml_collections

from hyperconn_jax.data import checks
from hyperconn_jax.data import images
from hyperconn_jax.data import sources
from hyperconn_jax.data import token_prepare


def _prepare_tokens(args, defaults: ml_collections.ConfigDict) -> None:
  if not args.out:
    raise SystemExit('--source needs --out, the directory (or gs:// prefix) of the token shards.')
  config = copy.deepcopy(defaults)
  config.data.update(dataset=sources.TOKENS, data_dir=args.out, tokenizer=args.tokenizer,
                     tokenizer_path=args.tokenizer_path, text_key=args.text_key,
                     eval_fraction=args.eval_fraction, piece_chars=args.piece_chars)
  checks.validate(config.data)
  splits = tuple(args.tfds_splits.split(','))
  if len(splits) != 2:
    raise SystemExit(f'--tfds_splits={args.tfds_splits!r}; expected TRAIN,EVAL split names.')
  options = token_prepare.Options(
      source=args.source, out=args.out, tokenizer=args.tokenizer,
      tokenizer_path=args.tokenizer_path, text_key=args.text_key,
      eval_fraction=args.eval_fraction, piece_chars=args.piece_chars,
      tfds_data_dir=args.tfds_data_dir, tfds_splits=splits, workers=args.workers)
  start = time.time()
  meta = token_prepare.prepare(options)
  print(f"{args.source} is tokenized in {args.out}: {meta['num_tokens']} tokens, "
        f"{meta['num_docs']} documents ({time.time() - start:.1f} s). Train on it with "
        f"--config.data.dataset=tokens --config.data.data_dir={args.out} "
        f'--config.data.tokenizer={args.tokenizer}'
        + (f' --config.data.tokenizer_path={args.tokenizer_path}' if args.tokenizer_path else ''))


def main(argv: list[str], defaults: ml_collections.ConfigDict, *, description: str = '') -> None:
  """Prepares what the flags in `argv` ask for.

  Args:
    argv: prepare.py's flags (without the program name).
    defaults: the full default config (configs/base.py's get_config()); not modified.
    description: for --help.
  """
  parser = argparse.ArgumentParser(description=description)
  data_defaults = defaults.data
  parser.add_argument('--source', default='',
                      help='token shards: a glob of text / jsonl / parquet files, or tfds:NAME')
  parser.add_argument('--out', default='', help='token shards: where to write them')
  parser.add_argument('--tokenizer', default=data_defaults.tokenizer, help='config.data.tokenizer')
  parser.add_argument('--tokenizer_path', default=data_defaults.tokenizer_path,
                      help='config.data.tokenizer_path')
  parser.add_argument('--text_key', default=data_defaults.text_key,
                      help='field / column / TFDS feature holding the text')
  parser.add_argument('--piece_chars', type=int, default=data_defaults.piece_chars,
                      help='text files: cut documents into pieces of at most this many chars')
  parser.add_argument('--tfds_data_dir', default='', help='for --source=tfds:NAME')
  parser.add_argument('--tfds_splits', default='train,validation',
                      help='for --source=tfds:NAME: its train and eval split names')
  parser.add_argument('--workers', type=int, default=os.cpu_count(),
                      help='token shards: worker processes')
  parser.add_argument('--dataset', default=data_defaults.dataset,
                      help="'stdlib', 'text_files' or a TFDS name (config.data.dataset)")
  parser.add_argument('--data_dir', default=data_defaults.data_dir,
                      help="where to prepare it ('' -> ~/tensorflow_datasets)")
  parser.add_argument('--text_glob', default=data_defaults.text_glob, help='for text_files')
  parser.add_argument('--eval_fraction', type=float, default=data_defaults.eval_fraction,
                      help='fraction of the documents in validation')
  args = parser.parse_args(argv)
  if args.source:
    _prepare_tokens(args, defaults)
    return

  config = copy.deepcopy(defaults)
  config.data.dataset = args.dataset
  config.data.data_dir = args.data_dir
  config.data.text_glob = args.text_glob
  config.data.eval_fraction = args.eval_fraction
  config.data.piece_chars = args.piece_chars
  checks.validate(config.data)
  data_dir = sources.resolve_data_dir(config.data)
  start = time.time()
  if args.dataset == images.DIGITS:
    images.ensure_prepared(config)
  elif args.dataset not in sources.PREPARED_HERE:
    try:
      sources.builder(config.data).download_and_prepare(file_format='array_record')
    except ModuleNotFoundError as e:
      # TFDS's own builders need importlib_resources (tensorflow-datasets 4.9.10 only declares it
      # for Python < 3.9), and some need TensorFlow or apache-beam to generate.
      raise SystemExit(
          f'Preparing {args.dataset} needs the Python package {e.name!r}: pip install {e.name}. '
          'Or prepare it on a machine with TensorFlow:\n'
          f'  tfds build {args.dataset} --data_dir={data_dir} --file_format=array_record\n'
          f'and copy {data_dir} here.') from e
  if args.dataset != images.DIGITS:
    sources.ensure_prepared(config)
  print(f'{args.dataset} is prepared in {data_dir} ({time.time() - start:.1f} s).')
