"""Trains a hyperconn_jax model; re-running with the same --workdir resumes from its latest checkpoint.

  python train.py --config=configs/default.py --workdir=workdirs/run1
  python train.py --config=configs/lm.py:ARGS --config.train.num_steps=2000 --workdir=DIR

Multi-process (e.g. a TPU pod): run the same command on every host; jax.distributed is initialised
from the cluster environment, or from --coordinator_address / --num_processes / --process_id.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hyperconn_jax import cli
from hyperconn_jax import distributed
from hyperconn_jax import host_malloc
from hyperconn_jax import metrics

_REPO = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
    'config', default=os.path.join(_REPO, 'configs', 'default.py'),
    help_string='Config file (path.py or path.py:ARGS); override fields with --config.a.b=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', os.path.join(_REPO, 'workdirs', 'default'),
    'Output directory: checkpoints/, metrics.jsonl, tensorboard/, config.json.')
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # --help lists them too.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  with cli.usage_errors():  # Before JAX starts any thread (see host_malloc).
    malloc = host_malloc.configure(_CONFIG.value.train.host_malloc)
  logging.info('Host malloc: %s (train.host_malloc=%r)', malloc, _CONFIG.value.train.host_malloc)
  _INITIALIZE_DISTRIBUTED()
  metrics.quiet_library_logs()
  # Imported after distributed initialisation: nothing may touch the JAX backend before it.
  from hyperconn_jax import train_lib  # pylint: disable=g-import-not-at-top
  # It validates the config (once) and raises cli.UsageError, a one-line error, for bad input.
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
