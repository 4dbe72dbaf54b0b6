"""Prepares a dataset once into a data_dir as array_record, ready for tfds data sources.

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
import time

from configs import base
from hyperconn_jax.data import checks
from hyperconn_jax.data import images
from hyperconn_jax.data import sources


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  defaults = base.get_config().data
  parser.add_argument('--dataset', default=defaults.dataset,
                      help="'stdlib', 'text_files' or a TFDS name (config.data.dataset)")
  parser.add_argument('--data_dir', default=defaults.data_dir,
                      help="where to prepare it ('' -> ~/tensorflow_datasets)")
  parser.add_argument('--text_glob', default=defaults.text_glob, help='for text_files')
  parser.add_argument('--eval_fraction', type=float, default=defaults.eval_fraction,
                      help='for stdlib / text_files: fraction of the files in validation')
  args = parser.parse_args(argv)

  config = base.get_config()
  config.data.dataset = args.dataset
  config.data.data_dir = args.data_dir
  config.data.text_glob = args.text_glob
  config.data.eval_fraction = args.eval_fraction
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
