"""Restores a training run's model for analysis and reads validation batches.

The parameters of `step` are restored (the optimizer is not) onto a one-device mesh of this
machine, whatever mesh the run was trained on, then put in the Python-loop layout the recorders
need (trace.loop_layout).
"""

import jax
from flax import nnx
import numpy as np

from hyperconn_jax import cli, data, rundir, sharding
from hyperconn_jax.analysis import trace


def load_config(workdir: str, defaults, *, data_dir: str | None = None):
  """The run's config (rundir.load_run_config; `defaults`: configs/base.py's) for a one-device
  mesh; unlocked."""
  config = rundir.load_run_config(workdir, defaults)
  config.mesh.shape = (1,) * len(config.mesh.axes)
  if data_dir is not None:
    config.data.data_dir = data_dir
  return config


def load_model(workdir: str, step: str | int = 'latest', *, defaults,
               data_dir: str | None = None):
  """Restores a checkpoint of the run in `workdir`.

  Args:
    workdir: the training run's working directory.
    step: 'latest', 'best' or a step number.
    defaults: every config field's default (configs/base.py's get_config(); see
      rundir.load_run_config).
    data_dir: where the run's dataset is prepared (default: the run's data.data_dir).

  Returns:
    (config, model in the loop layout with the restored parameters, the checkpoint step).
  """
  with cli.usage_errors():  # A wrong workdir or step, not a failure.
    config = load_config(workdir, defaults, data_dir=data_dir)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = sharding.logical_rules(config.mesh)
  graphdef, restored, checkpoint_step = rundir.restore_model(workdir, config, step, mesh, rules)
  model = nnx.merge(graphdef, restored['params'], restored['rest'])
  return config, trace.loop_layout(model, config.model), checkpoint_step


def validation_batches(config, num_batches: int) -> list[dict[str, np.ndarray]]:
  """`num_batches` batches ({'inputs', 'targets', 'weights'}: [B, L]) of the validation split,
  the same ones on every call."""
  data.ensure_prepared(config)
  return list(data.make_eval_iterator(config, num_batches=num_batches))
