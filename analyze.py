"""Analyses of what a checkpoint's connections learned, on validation text (JSON + PNG).

  python analyze.py --workdir=workdirs/dhc4 --step=best
  python analyze.py --workdir=workdirs/prenorm --workdir=workdirs/dhc4 --workdir=workdirs/mhc4 \
    --analyses=collapse,gain --compare_dir=workdirs/compare

Analyses (hyperconn_jax/analysis):
  connections   unrolled connection matrices C^(0) and per-stream C^(i) (HC App. F), heatmaps
  collapse      cosine similarity of adjacent sub-layers' inputs, median and 5-95% (HC Fig. 3)
  gain          Amax gain of single and composite residual mixing, forward / backward (mHC)
  coefficients  per-layer distributions of the dynamic alpha / beta (mHC: H_pre, H_post, H_res)
Each writes WORKDIR/analysis/<analysis>_<step>.json and .png; with several --workdir the collapse
and gain results are also overlaid in COMPARE_DIR/compare_<analysis>.png. The model is restored
on one device of this machine.
"""

import os

from absl import app
from absl import flags

from hyperconn_jax import cli
from hyperconn_jax import host_malloc
from hyperconn_jax import metrics

_WORKDIR = flags.DEFINE_multi_string('workdir', None, 'Training run directory (repeatable).',
                                     required=True)
_STEP = flags.DEFINE_string('step', 'latest', "Checkpoint: 'latest', 'best' or a step number.")
_ANALYSES = flags.DEFINE_list('analyses', ['connections', 'collapse', 'gain', 'coefficients'],
                              'Analyses to run.')
_BATCHES = flags.DEFINE_integer('batches', 4, 'Validation batches to average over.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "Where the dataset is prepared (default: the "
                                "run's data.data_dir).")
_COMPARE_DIR = flags.DEFINE_string('compare_dir', None, 'Where the overlay plots of several '
                                   'workdirs go (default: the first workdir\'s analysis/).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from configs import base  # pylint: disable=g-import-not-at-top
  host_malloc.configure(base.get_config().train.host_malloc)  # Before JAX starts threads.
  metrics.quiet_library_logs()
  from hyperconn_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  try:
    analyses = runner.check_analyses(_ANALYSES.value)
  except ValueError as e:
    raise app.UsageError(f'--analyses: {e}') from None
  labels = [os.path.basename(os.path.normpath(w)) for w in _WORKDIR.value]
  if len(set(labels)) < len(labels):  # e.g. .../dhc4/seed0 and .../mhc4/seed0
    labels = ['/'.join(os.path.normpath(w).split(os.sep)[-2:]) for w in _WORKDIR.value]
  results = {}
  for workdir, label in zip(_WORKDIR.value, labels):
    r = runner.analyze_checkpoint(workdir, _STEP.value, defaults=base.get_config(),
                                  analyses=analyses, num_batches=_BATCHES.value,
                                  data_dir=_DATA_DIR.value, label=label)
    results[label] = r
    print(f'{workdir} step {r["step"]} ({r["num_tokens"]} tokens):')
    for path in r['files']:
      print(f'  {path}')
  if len(results) > 1:
    out = _COMPARE_DIR.value or os.path.join(_WORKDIR.value[0], 'analysis')
    for path in runner.compare(results, out):
      print(f'  {path}')


if __name__ == '__main__':
  cli.run(main)
