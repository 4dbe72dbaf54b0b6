"""Prepares data once: token shards (any corpus) or a TFDS dataset as array_record.

Token shards (data.dataset='tokens', data.data_dir=OUT; see token_prepare.py and token_shards.py):

  python -m hyperconn_jax.data.prepare --source='corpus/*.parquet' --out=gs://BUCKET/tokens/web \
      --tokenizer=huggingface --tokenizer_path=gs://BUCKET/gpt-neox-20b/tokenizer.json --workers=16
  python -m hyperconn_jax.data.prepare --source='books/**/*.txt' --out=DIR    # bytes tokenizer
  python -m hyperconn_jax.data.prepare --source=tfds:lm1b --tfds_data_dir=DIR \
      --tfds_splits=train,test --out=DIR2 --tokenizer=sentencepiece --tokenizer_path=m.model

  --source is a glob of text / jsonl(.gz) / parquet files (documents in field --text_key) or
  tfds:NAME; a rerun after an interruption resumes where it stopped.

TFDS datasets as array_record, read (and tokenized) during training:

  python -m hyperconn_jax.data.prepare --dataset=stdlib --data_dir=DIR
  python -m hyperconn_jax.data.prepare --dataset=text_files --text_glob='books/*.txt' --data_dir=DIR
  python -m hyperconn_jax.data.prepare --dataset=lm1b --data_dir=DIR
  python -m hyperconn_jax.data.prepare --dataset=digits --data_dir=DIR   # embedded 8x8 images

Run from the repository root (defaults come from configs/base.py). 'stdlib' and 'text_files' are
also prepared automatically by training; any other name is a TFDS dataset, downloaded and generated
by TFDS (some TFDS datasets need TensorFlow or apache-beam to generate: then run
`tfds build NAME --data_dir=DIR --file_format=array_record` where those are installed and copy DIR).
"""

import argparse
import os
import time

from configs import base
from hyperconn_jax.data import checks
from hyperconn_jax.data import images
from hyperconn_jax.data import sources
from hyperconn_jax.data import token_prepare


def _prepare_tokens(args) -> None:
  if not args.out:
    raise SystemExit('--source needs --out, the directory (or gs:// prefix) of the token shards.')
  config = base.get_config()
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  defaults = base.get_config().data
  parser.add_argument('--source', default='',
                      help='token shards: a glob of text / jsonl / parquet files, or tfds:NAME')
  parser.add_argument('--out', default='', help='token shards: where to write them')
  parser.add_argument('--tokenizer', default=defaults.tokenizer, help='config.data.tokenizer')
  parser.add_argument('--tokenizer_path', default=defaults.tokenizer_path,
                      help='config.data.tokenizer_path')
  parser.add_argument('--text_key', default=defaults.text_key,
                      help='field / column / TFDS feature holding the text')
  parser.add_argument('--piece_chars', type=int, default=defaults.piece_chars,
                      help='text files: cut documents into pieces of at most this many chars')
  parser.add_argument('--tfds_data_dir', default='', help='for --source=tfds:NAME')
  parser.add_argument('--tfds_splits', default='train,validation',
                      help='for --source=tfds:NAME: its train and eval split names')
  parser.add_argument('--workers', type=int, default=os.cpu_count(),
                      help='token shards: worker processes')
  parser.add_argument('--dataset', default=defaults.dataset,
                      help="'stdlib', 'text_files' or a TFDS name (config.data.dataset)")
  parser.add_argument('--data_dir', default=defaults.data_dir,
                      help="where to prepare it ('' -> ~/tensorflow_datasets)")
  parser.add_argument('--text_glob', default=defaults.text_glob, help='for text_files')
  parser.add_argument('--eval_fraction', type=float, default=defaults.eval_fraction,
                      help='fraction of the documents in validation')
  args = parser.parse_args(argv)
  if args.source:
    _prepare_tokens(args)
    return

  config = base.get_config()
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


if __name__ == '__main__':
  main()
