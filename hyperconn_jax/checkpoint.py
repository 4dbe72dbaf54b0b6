"""Checkpoints: a thin wrapper over orbax's V0 CheckpointManager (WORKDIR/checkpoints/<step>/).

Each step directory holds the items
  model      {'params': ..., 'rest': ...}: pure nnx states of the nnx.Param and non-Param variables
  opt_state  the optax state
  data_iter  the grain iterator state of this process (data/iterator_state.py)
  config     the run's config as JSON
  meta       JSON: step, library versions, mesh
plus orbax's _CHECKPOINT_METADATA (with the step's metrics) and commit marker. Saves are written to
a temporary directory and renamed when complete, so a step interrupted half-way is never listed;
unfinished temporary directories are removed when the manager opens.

WORKDIR may be any etils.epath URL: orbax (tensorstore) writes the arrays straight to a bucket.
On a local disk a step is written to a temporary directory and renamed when complete; on an object
store (no atomic rename) it is written in place and only the commit marker, written last, makes it
a finished step; orbax lists no step without one.

Retention: the latest `checkpoint.keep_latest` steps, the `checkpoint.keep_best` steps with the
lowest eval_loss (steps saved without metrics are ranked by LatestN only), and with
`checkpoint.keep_every` = K > 0 every step that is a multiple of K (for evaluations along a long
run). `best_fn` is set as well as the BestN policy, because orbax persists metrics only when
best_fn is set, and the ranking must survive restarts.

Restores take abstract targets (jax.ShapeDtypeStruct with shardings), so a checkpoint written on
one mesh restores onto any other mesh or device count. The data iterator state is saved per
process; a training run resumes on another process count only when it is per shard (a fixed
data.num_shards, data.worker_count = 0: each process takes its shards' states), else only with the
process count that wrote the checkpoint (checked first, with a clear error); the model alone
(eval) restores with any.

Damaged steps: `restore_latest` checks each step, newest first, for its commit marker
(commit_success.txt), orbax's _CHECKPOINT_METADATA and every item directory, then restores it.
When an older step restores, each newer step that failed (a missing, deleted or truncated file)
is logged as a warning naming it and moved aside to CHECKPOINTS/<step>.damaged (kept for
inspection; orbax ignores the name, and training can save that step again). On a local disk that
is one rename; on an object store every object is copied to <step>.damaged first and the step is
deleted only after the copy is complete, so an interrupted move loses nothing (the next start
finds the step damaged again and copies it to <step>.damaged-2).
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp_lib

from hyperconn_jax import models
from hyperconn_jax.data import iterator_state
from hyperconn_jax.paths import as_path, copy_tree, is_remote

PyTree = Any
_METRIC = 'eval_loss'
ITEMS = ('model', 'opt_state', 'data_iter', 'config', 'meta')
_COMMIT_MARKER = 'commit_success.txt'
_STEP_METADATA = '_CHECKPOINT_METADATA'
DAMAGED_SUFFIX = '.damaged'
DIRECTORY = 'checkpoints'  # Under the workdir.


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step cannot be read: a file is missing, truncated or not finalized."""


def _eval_loss(metrics: dict[str, float]) -> float:
  return metrics[_METRIC]


def abstract_model_state(model_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules
                         ) -> tuple[nnx.GraphDef, PyTree, nnx.State]:
  """The model's graphdef, its abstract pure state {'params', 'rest'} (ShapeDtypeStructs with
  shardings on `mesh`: the restore target of the 'model' item) and the typed abstract parameters
  (for the decay mask)."""
  graphdef, abstract_state = models.abstract_model(model_config, mesh, rules)
  typed_params, typed_rest = nnx.split_state(abstract_state, nnx.Param, ...)
  return graphdef, {'params': nnx.as_pure(typed_params), 'rest': nnx.as_pure(typed_rest)}, typed_params


def fingerprint(workdir: str, step: int) -> str | None:
  """Identifies the checkpoint of `step` in `workdir`, e.g. '300@1796040939354834836' (the step and
  the commit time orbax recorded in it), so that results derived from a checkpoint can tell a
  retrained run's checkpoint of the same step from the old one; None if it has no readable
  metadata (or does not exist)."""
  try:
    meta = json.loads((as_path(workdir) / DIRECTORY / str(step) / _STEP_METADATA).read_text())
  except (OSError, ValueError):
    return None
  stamp = meta.get('commit_timestamp_nsecs') or meta.get('init_timestamp_nsecs')
  return f'{step}@{stamp}' if stamp else None


class Checkpointer:
  """Saves and restores training runs under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, checkpoint_config: ml_collections.ConfigDict, *,
               read_only: bool = False):
    """Opens (or creates) the checkpoint directory.

    Args:
      workdir: the run's working directory.
      workdir: the run's working directory (a local path or an epath URL such as gs://...).
      checkpoint_config: config.checkpoint (keep_latest, keep_best, keep_every, async_save).
      read_only: open an existing directory without creating, saving or deleting anything (eval).
    """
    self.directory = as_path(workdir) / DIRECTORY
    policies = [pp_lib.LatestN(checkpoint_config.keep_latest)]
    if checkpoint_config.keep_every > 0:
      policies.append(pp_lib.EveryNSteps(interval_steps=checkpoint_config.keep_every))
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
        data_iter=iterator_state.Save(data_iter),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(dict(meta, step=step)))
    self._manager.save(step, args=args, metrics=metrics, force=True)

  def step_directory(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def check_step(self, step: int) -> str | None:
    """What makes `step` incomplete (a missing marker, metadata file or item), or None.

    Reads no arrays: a truncated or deleted array file is only found by restoring.
    """
    path = self.step_directory(step)
    if not (path / _COMMIT_MARKER).is_file():
      return f'no commit marker {_COMMIT_MARKER} (the save did not finish)'
    try:
      json.loads((path / _STEP_METADATA).read_text())
    except (OSError, ValueError) as e:
      return f'unreadable {_STEP_METADATA} ({type(e).__name__}: {e})'
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing:
      return f'missing items {missing}'
    return None

  def saved_process_count(self, step: int) -> int | None:
    """The number of processes that wrote `step` (from its meta item; None if not recorded)."""
    return self.restore_json(step, 'meta').get('process_count')

  def restore_latest(self, *, model: PyTree, opt_state: PyTree | None = None,
                     data_iter: Any = None) -> tuple[int, dict[str, Any]] | None:
    """Restores the newest readable step; newer unreadable steps are moved aside as damaged.

    A newer step counts as damaged only once an older one restored onto the same targets: that
    proves the targets fit, so the newer step's failure is in its files. If no step restores
    (e.g. the model config changed), nothing is moved and the error lists every step's failure.

    Args: as `restore`, without the step.

    Returns:
      (step, restored items), or None if there is no checkpoint at all.

    Raises:
      ValueError: the data iterator is requested and the newest readable step was written by
        another number of processes (its state is per process).
      DamagedCheckpointError: no step could be restored.
    """
    failed = []  # (step, reason), newest first.
    for step in reversed(self.all_steps()):
      reason = self.check_step(step)
      if reason is None:
        try:
          written_by = self.saved_process_count(step)
        except Exception as e:  # pylint: disable=broad-except  (any unreadable meta is damage)
          reason = _first_line(f'unreadable meta item ({type(e).__name__}: {e})')
      if (reason is None and data_iter is not None and written_by is not None and
          written_by != jax.process_count() and not iterator_state.restorable(
              self.step_directory(step) / 'data_iter', data_iter)):
        raise ValueError(
            f'checkpoint step {step} in {self.directory} was written by {written_by} processes, '
            f'but this run has {jax.process_count()}: its data iterator state cannot be '
            f'redistributed. Resume with {written_by} processes (eval.py restores the model on any '
            'number); a run started with a fixed data.num_shards and data.worker_count=0 resumes '
            'on any process count that divides data.num_shards.')
      restored = None
      if reason is None:
        try:
          restored = self.restore(step, model=model, opt_state=opt_state, data_iter=data_iter)
        except DamagedCheckpointError as e:
          cause = e.__cause__ or e
          reason = _first_line(f'{type(cause).__name__}: {cause}')
      # Every process must take the same step: a file may be unreadable from one host only.
      if not _all_processes_agree(reason is None):
        reason = reason or 'another process could not read it'
      if reason is not None:
        failed.append((step, reason))
        continue
      for bad_step, bad_reason in failed:
        moved_to = self._set_aside(bad_step)
        logging.warning('Checkpoint step %d in %s is damaged (%s); moved it to %s.', bad_step,
                        self.directory, bad_reason, moved_to)
      if failed:
        logging.warning('Resuming from checkpoint step %d, the newest readable one.', step)
      return step, restored
    if failed:
      raise DamagedCheckpointError(
          f'no checkpoint in {self.directory} can be restored (nothing was moved or deleted):\n' +
          '\n'.join(f'  step {step}: {reason}' for step, reason in failed) +
          '\nIf the model or optimizer config changed, use a new workdir; if the files are '
          'damaged, move those step directories away to start from scratch.')
    return None

  def _set_aside(self, step: int) -> epath.Path:
    """Moves the step directory to <step>.damaged[-k] (process 0; all processes wait)."""
    source = self.step_directory(step)
    target = source.parent / f'{source.name}{DAMAGED_SUFFIX}'
    k = 1
    while target.exists():
      k += 1
      target = source.parent / f'{source.name}{DAMAGED_SUFFIX}-{k}'
    if jax.process_index() == 0:
      _move_directory(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'hyperconn_jax_set_aside_{step}')
    self._manager.reload()
    return target

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
      DamagedCheckpointError (a RuntimeError) naming the step directory if the checkpoint cannot
      be read (damaged files).
    """
    items = {'model': ocp.args.StandardRestore(model)}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(opt_state)
    if data_iter is not None:
      items['data_iter'] = iterator_state.Restore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for damaged files.
      raise DamagedCheckpointError(
          f'cannot restore checkpoint step {step} from {self.step_directory(step)} '
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


def _move_directory(source: epath.Path, target: epath.Path) -> None:
  """Moves a directory: one rename on a local disk; on an object store (no rename of
  directories) a copy of every object, then the deletion of the source."""
  if not is_remote(source):
    os.rename(source, target)
    return
  copy_tree(source, target)
  source.rmtree()


def _all_processes_agree(ok: bool) -> bool:
  """True if `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _first_line(text: str, limit: int = 300) -> str:
  """The first line of an error message, at most `limit` characters (tensorstore's are long)."""
  line = text.strip().splitlines()[0] if text.strip() else text
  return line if len(line) <= limit else line[:limit] + '...'
