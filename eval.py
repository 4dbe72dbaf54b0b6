"""Evaluates a checkpoint of a training run on the validation split (language models: loss,
perplexity, bits/byte; classifiers (model.name='vit'): loss and top-1 accuracy).

  python eval.py --workdir=workdirs/run1 --step=best
  python eval.py --workdir=DIR --step=1000 --eval_batches=0 --mesh_shape=1,-1,1

Reads WORKDIR/config.json, restores the model parameters (not the optimizer) of the chosen step
onto a mesh over the devices of this machine, whatever mesh the run was trained on, prints a table
and writes WORKDIR/eval_<step>.json.
"""

from absl import app
from absl import flags
from absl import logging

from hyperconn_jax import cli
from hyperconn_jax import distributed
from hyperconn_jax import host_malloc
from hyperconn_jax import metrics

_WORKDIR = flags.DEFINE_string('workdir', None, 'Working directory of a training run.',
                               required=True)
_STEP = flags.DEFINE_string('step', 'latest', "Checkpoint: 'latest', 'best' or a step number.")
_EVAL_BATCHES = flags.DEFINE_integer(
    'eval_batches', None, 'Batches to evaluate (default: the run\'s train.eval_batches; '
    '<= 0: the whole validation split).')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, "Global eval batch size (default: the run's train.eval_batch_size, or its "
    'training microbatch if 0).')
_MESH_SHAPE = flags.DEFINE_string(
    'mesh_shape', '', "Mesh shape, e.g. '1,-1,1' (default: the run's, if it fits this machine's "
    'devices, else the default of configs/base.py).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "Where the dataset is prepared (default: the "
                                "run's data.data_dir).")
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # --help lists them too.


def load_config(workdir: str, *, eval_batches: int | None = None, batch_size: int | None = None,
                mesh_shape: tuple[int, ...] | None = None, data_dir: str | None = None):
  """The run's config from WORKDIR/config.json with the eval overrides applied (locked)."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from hyperconn_jax import config_lib, rundir  # pylint: disable=g-import-not-at-top
  defaults = base.get_config()
  config = rundir.load_run_config(workdir, defaults)
  if eval_batches is not None:
    config.train.eval_batches = eval_batches
  if batch_size is not None:
    config.train.eval_batch_size = batch_size
  if data_dir is not None:
    config.data.data_dir = data_dir
  if mesh_shape is not None:
    config.mesh.shape = tuple(mesh_shape)
  else:
    try:
      config_lib.validate_mesh_for_devices(config, jax.device_count())
    except ValueError:
      logging.info('The run\'s mesh.shape %s does not fit %d devices; using %s.',
                   config.mesh.shape, jax.device_count(), defaults.mesh.shape)
      config.mesh.shape = defaults.mesh.shape
  config.lock()
  return config


def evaluate_checkpoint(workdir: str, step: str = 'latest', **overrides) -> dict:
  """Restores `step` of the run in `workdir` onto this machine's devices and evaluates it.

  Args:
    workdir: the training run's working directory.
    step: 'latest', 'best' or a step number (as a string or int).
    **overrides: eval_batches, batch_size, mesh_shape, data_dir (see load_config).

  Returns:
    {'step': the checkpoint step, 'eval_loss', 'eval_ppl', 'eval_bits_per_byte', 'eval_tokens',
     'eval_batches'} (classifiers: 'eval_loss', 'eval_accuracy', 'eval_examples' instead of the
    LM metrics); also written to WORKDIR/eval_<step>.json by process 0.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from hyperconn_jax import (config_lib, data, evaluation, rundir, sharding,  # pylint: disable=g-import-not-at-top
                             tasks)
  with cli.usage_errors():
    config = load_config(workdir, **overrides)
    config_lib.validate(config)
    config_lib.validate_mesh_for_devices(config, jax.device_count())
  data.ensure_prepared(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  graphdef, model, checkpoint_step = rundir.restore_model(workdir, config, step, mesh, rules)
  with sharding.activate(mesh, rules):
    evaluator = evaluation.Evaluator(config, graphdef, jax.tree.map(lambda x: x.sharding, model),
                                     tasks.batch_sharding(config, mesh, rules))
    result = evaluator(model)
  result = {'step': checkpoint_step, **result, 'eval_batches': config.train.eval_batches}
  if jax.process_index() == 0:
    rundir.write_eval_result(workdir, checkpoint_step, result)
  return result


def format_table(result: dict) -> str:
  """The result as a two-column text table."""
  width = max(len(k) for k in result)
  return '\n'.join(f'{k:<{width}}  {v:.6g}' if isinstance(v, float) else f'{k:<{width}}  {v}'
                   for k, v in result.items())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from configs import base  # pylint: disable=g-import-not-at-top
  host_malloc.configure(base.get_config().train.host_malloc)  # Before JAX starts threads.
  _INITIALIZE_DISTRIBUTED()
  metrics.quiet_library_logs()
  mesh_shape = None
  if _MESH_SHAPE.value:
    try:
      mesh_shape = tuple(int(s) for s in _MESH_SHAPE.value.split(','))
    except ValueError:
      raise app.UsageError(f"--mesh_shape={_MESH_SHAPE.value!r}: expected integers like "
                           "'1,-1,1'") from None
  result = evaluate_checkpoint(_WORKDIR.value, _STEP.value, eval_batches=_EVAL_BATCHES.value,
                               batch_size=_BATCH_SIZE.value, mesh_shape=mesh_shape,
                               data_dir=_DATA_DIR.value)
  print(format_table(result))


if __name__ == '__main__':
  cli.run(main)
