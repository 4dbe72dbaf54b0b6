"""Checkpoints: a thin wrapper over orbax's V0 CheckpointManager (WORKDIR/checkpoints/<step>/).

Each step directory holds the items
  model      {'params': ..., 'rest': ...}: pure nnx states of the nnx.Param and non-Param variables
  opt_state  the optax state
  data_iter  the grain iterator state of this process (grain.checkpoint.CheckpointSave)
  config     the run's config as JSON
  meta       JSON: step, library versions, mesh
plus orbax's _CHECKPOINT_METADATA (with the step's metrics) and commit marker. Saves are written to
a temporary directory and renamed when complete, so a step interrupted half-way is never listed;
unfinished temporary directories are removed when the manager opens.

Retention: the latest `checkpoint.keep_latest` steps plus the `checkpoint.keep_best` steps with
the lowest eval_loss (steps saved without metrics are ranked by LatestN only). `best_fn` is set as
well as the BestN policy, because orbax persists metrics only when best_fn is set, and the ranking
must survive restarts.

Restores take abstract targets (jax.ShapeDtypeStruct with shardings), so a checkpoint written on
one mesh restores onto any other mesh or device count.
"""

import os
from typing import Any

from absl import logging
import grain
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp_lib

PyTree = Any
_METRIC = 'eval_loss'


def _eval_loss(metrics: dict[str, float]) -> float:
  return metrics[_METRIC]


class Checkpointer:
  """Saves and restores training runs under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, checkpoint_config: ml_collections.ConfigDict, *,
               read_only: bool = False):
    """Opens (or creates) the checkpoint directory.

    Args:
      workdir: the run's working directory.
      checkpoint_config: config.checkpoint (keep_latest, keep_best, async_save).
      read_only: open an existing directory without creating, saving or deleting anything (eval).
    """
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    policies = [pp_lib.LatestN(checkpoint_config.keep_latest)]
    if checkpoint_config.keep_best > 0:
      policies.append(pp_lib.BestN(get_metric_fn=_eval_loss, reverse=True,
                                   n=checkpoint_config.keep_best,
                                   keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=_eval_loss, best_mode='min',
        preservation_policy=pp_lib.AnyPreservationPolicy(policies),
        enable_async_checkpointing=checkpoint_config.async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """The finalized steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest eval_loss (None if no step has metrics)."""
    return self._manager.best_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with `step` (None if it was saved without)."""
    return self._manager.metrics(step) or None

  def resolve_step(self, spec: str | int) -> int:
    """Maps 'latest' | 'best' | a step number to an existing step; ValueError if there is none."""
    steps = self.all_steps()
    if spec == 'latest':
      step = self.latest_step()
    elif spec == 'best':
      step = self.best_step()
      if step is None:
        raise ValueError(f'--step=best: no checkpoint in {self.directory} was saved with an '
                         f'{_METRIC} (available steps: {steps})')
    else:
      try:
        step = int(spec)
      except ValueError:
        raise ValueError(f"--step={spec!r}: must be 'latest', 'best' or a step number") from None
      if step not in steps:
        raise ValueError(f'--step={step}: no such checkpoint in {self.directory} '
                         f'(available steps: {steps})')
    if step is None:
      raise ValueError(f'no checkpoint in {self.directory}')
    return step

  def save(self, step: int, *, model: PyTree, opt_state: PyTree, data_iter: Any,
           config_json: dict[str, Any], meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts saving one step (asynchronously if checkpoint.async_save).

    Device arrays are copied to host before this returns, so the caller may then donate or
    overwrite them. Call `wait()` before relying on the files.

    Args:
      step: the number of updates the state has seen.
      model: {'params': pure params, 'rest': pure non-Param variables}.
      opt_state: the optax state.
      data_iter: the grain DatasetIterator positioned after `step` batches.
      config_json: the config as a JSON-able dict.
      meta: JSON-able facts about the run (versions, mesh).
      metrics: {'eval_loss': ..., ...} if an eval was run at this step (ranks best-N).
    """
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        opt_state=ocp.args.StandardSave(opt_state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(dict(meta, step=step)))
    self._manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, *, model: PyTree, opt_state: PyTree | None = None,
              data_iter: Any = None) -> dict[str, Any]:
    """Restores `step` onto the shardings of the abstract targets.

    Args:
      step: an existing step (see resolve_step).
      model: abstract {'params', 'rest'} (ShapeDtypeStructs with shardings on the current mesh).
      opt_state: abstract optax state, or None to skip it (eval restores the model only).
      data_iter: a grain DatasetIterator whose state is set in place, or None to skip it.

    Returns:
      {'model': ..., 'opt_state': ... (if requested)} as arrays on the targets' shardings.

    Raises:
      RuntimeError naming the step directory if the checkpoint cannot be read (damaged files).
    """
    items = {'model': ocp.args.StandardRestore(model)}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(opt_state)
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for damaged files.
      raise RuntimeError(
          f'cannot restore checkpoint step {step} from {os.path.join(self.directory, str(step))} '
          f'({type(e).__name__}: {e}). If it is damaged, move that directory away to use an '
          f'earlier step (available: {self.all_steps()}).') from e
    return {k: restored[k] for k in items if k != 'data_iter'}

  def restore_json(self, step: int, item: str) -> dict[str, Any]:
    """Reads the JSON item 'config' or 'meta' of `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item]

  def reached_preemption(self, step: int) -> bool:
    """True when a multi-process run agreed to stop at `step` (jax.distributed preemption sync)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written and finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
    logging.info('Checkpoint manager closed (%s).', self.directory)
