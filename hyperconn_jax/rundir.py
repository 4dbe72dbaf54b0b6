"""A training run's directory: every file train.py, eval.py and analyze.py read or write there.

WORKDIR is a local path or any etils.epath URL (gs://bucket/run, ...). Its layout:
  config.json      the run's config (JSON; tuples as lists)
  run.json         facts of the latest invocation (versions, devices, mesh)
  metrics.jsonl    one JSON row per logged step (training and eval metrics)
  eval_<step>.json eval.py's result for a checkpoint step
  tensorboard/     TensorBoard events (tensorboardX)
  checkpoints/     orbax steps (checkpoint.py)

Object stores have no append and no atomic rename, so each file is written whole in one request
(an object is either the old or the new version), and the metrics are buffered: written at most
every FLUSH_SECONDS on a bucket (every row on a local disk), and always when a checkpoint is
saved and when the run ends, so a resumed run finds every row up to its checkpoint.
"""

import copy
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from hyperconn_jax import checkpoint
from hyperconn_jax import cli
from hyperconn_jax import connections
from hyperconn_jax import sharding
from hyperconn_jax.paths import as_path, is_remote

CONFIG_FILE = 'config.json'
RUN_FACTS_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
CHECKPOINTS_DIR = 'checkpoints'
# How often buffered metrics reach a bucket (each write rewrites the whole object).
FLUSH_SECONDS = 60.0


def write_json(path: epath.Path, value: Any) -> None:
  """Writes `value` as indented JSON in one request (parent directories created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2))


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------- config <-> JSON


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as a JSON-able dict (tuples become lists)."""
  return json.loads(config.to_json())


def config_from_json(config_json: dict[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of config_to_json: lists become tuples again (configs hold tuples, never lists)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    return x
  return ml_collections.ConfigDict(tuples(config_json))


def _merge(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict) -> None:
  """Overwrites `config`'s fields (recursively) with those of `saved`, adding unknown ones."""
  for key, value in saved.items():
    if (isinstance(value, ml_collections.ConfigDict) and key in config
        and isinstance(config[key], ml_collections.ConfigDict)):
      _merge(config[key], value)
    else:
      config[key] = value


def load_run_config(workdir: str,
                    defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run was trained with (WORKDIR/config.json), unlocked.

  Args:
    workdir: the training run's working directory.
    defaults: every field's default (configs/base.py's get_config(), passed in by the entry
      point: library code does not import configs/); not modified. Fields added after the run
      was trained take these values, so older runs stay loadable.
  """
  path = as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ValueError(f'--workdir={workdir}: no {CONFIG_FILE} (is it a training run directory?)')
  saved_json = read_json(path)
  # Runs written before the per-kind connection sub-configs hold a flat model.connection.
  model_json = saved_json.get('model', {})
  if 'connection' in model_json:
    model_json['connection'] = connections.migrate(model_json['connection'])
  config = copy.deepcopy(defaults)
  config.unlock()
  _merge(config, config_from_json(saved_json))
  return config


def write_run_start(workdir: str, config_json: dict[str, Any], facts: dict[str, Any]) -> None:
  """Writes WORKDIR/config.json and WORKDIR/run.json (the facts of this invocation)."""
  write_json(as_path(workdir) / CONFIG_FILE, config_json)
  write_json(as_path(workdir) / RUN_FACTS_FILE, facts)


def read_run_facts(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/run.json, or None if the run has none."""
  path = as_path(workdir) / RUN_FACTS_FILE
  return read_json(path) if path.exists() else None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl ([] if there is none)."""
  path = as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_eval_result(workdir: str, step: int, result: dict[str, Any]) -> str:
  """Writes eval.py's result to WORKDIR/eval_<step>.json; returns the path."""
  path = as_path(workdir) / f'eval_{step}.json'
  write_json(path, result)
  return os.fspath(path)


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
  """WORKDIR/metrics.jsonl: appended row by row on a local disk, rewritten whole (buffered)
  on an object store."""

  def __init__(self, workdir: str, resume_step: int | None):
    """Opens the log, keeping only rows up to `resume_step` when resuming (the rows an
    interrupted run logged after its checkpoint are about to be recomputed)."""
    self._path = as_path(workdir) / METRICS_FILE
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = is_remote(self._path)
    kept = [] if resume_step is None else [
        json.dumps(row) + '\n' for row in read_metrics(workdir) if row['step'] <= resume_step]
    self._lines = kept
    self._last_flush = time.monotonic()
    if self._remote:
      self._path.write_text(''.join(kept))
      self._file = None
    else:
      self._file = self._path.open('w')
      self._file.writelines(kept)
      self._file.flush()

  def write(self, row: dict[str, Any]) -> bool:
    """Adds one row; returns True if the rows were written out now."""
    line = json.dumps(row) + '\n'
    if not self._remote:
      self._file.write(line)
      self._file.flush()
      return True
    self._lines.append(line)
    if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
      self.flush()
      return True
    return False

  def flush(self) -> None:
    if self._remote:
      self._path.write_text(''.join(self._lines))
      self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()


# ----------------------------------------------------------------------------- checks


def ensure_writable(workdir: str) -> None:
  """Creates WORKDIR/checkpoints and writes (and removes) a probe file in it.

  Raises:
    ValueError naming the path if it cannot be created or written (run this before compiling).
  """
  directory = as_path(workdir) / CHECKPOINTS_DIR
  probe = directory / f'.write_probe_{jax.process_index()}_{os.getpid()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError locally; clients raise others)
    raise ValueError(f'workdir={workdir!r} is not writable ({type(e).__name__}: {e}); training '
                     'writes its checkpoints and metrics there.') from e


def ensure_shared(workdir: str, run_id: int | None = None) -> None:
  """Checks that every process sees the same WORKDIR (a collective; a no-op for one process).

  Process 0 writes a token that every other process must read back: orbax saves one checkpoint
  from all processes into one directory, so a host-local directory (e.g. /tmp on each host)
  would leave each host with a part of every checkpoint.

  Args:
    workdir: the run's working directory.
    run_id: the token's content (default: a random number drawn by process 0 and broadcast).

  Raises:
    ValueError (on every process) naming the processes that could not read the token.
  """
  if jax.process_count() == 1:
    return
  if run_id is None:
    run_id = int(multihost_utils.broadcast_one_to_all(
        np.asarray(np.random.default_rng().integers(1, 2**31 - 1), np.int64)))
  token = as_path(workdir) / CHECKPOINTS_DIR / f'.shared_workdir_token_{run_id}'
  if jax.process_index() == 0:
    token.write_text(str(run_id))
  multihost_utils.sync_global_devices('hyperconn_jax_shared_workdir_written')
  try:
    seen = token.exists() and token.read_text() == str(run_id)
  except Exception:  # pylint: disable=broad-except
    seen = False
  seen_by = multihost_utils.process_allgather(np.asarray(seen, np.int32))
  if jax.process_index() == 0:
    token.unlink()
  # In a bucket the token may be the only object under checkpoints/, whose "directory" then
  # vanishes: no process may list it (orbax's exists-then-iterdir) until the removal is done.
  multihost_utils.sync_global_devices('hyperconn_jax_shared_workdir_token_removed')
  missing = [int(p) for p in np.flatnonzero(np.asarray(seen_by) == 0)]
  if missing:
    raise ValueError(
        f'workdir={workdir!r} is not shared by all {jax.process_count()} processes: processes '
        f'{missing} cannot read the file process 0 wrote in it. Use a directory every host '
        'sees (a bucket such as gs://BUCKET/run, or a shared file system), not a host-local one.')
  logging.info('workdir %s is shared by all %d processes.', workdir, jax.process_count())


# ----------------------------------------------------------------------------- restoring models


def restore_model(workdir: str, config: ml_collections.ConfigDict, step: str | int,
                  mesh: jax.sharding.Mesh, rules) -> tuple[Any, dict[str, Any], int]:
  """Restores the model (not the optimizer) of a checkpoint of the run in `workdir`.

  Args:
    workdir: the training run's working directory.
    config: the run's config (load_run_config) with the mesh it is restored onto.
    step: 'latest', 'best' or a step number.
    mesh, rules: where the parameters go (any mesh: orbax reshards on restore).

  Returns:
    (graphdef, {'params', 'rest'} pure states on `mesh`, the checkpoint step).

  Raises:
    ValueError: no such step; checkpoint.DamagedCheckpointError: unreadable files.
  """
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    with cli.usage_errors():  # A wrong step is the user's input.
      checkpoint_step = ckpt.resolve_step(step)
    with sharding.activate(mesh, rules):
      graphdef, abstract, _ = checkpoint.abstract_model_state(config.model, mesh, rules)
      model = ckpt.restore(checkpoint_step, model=abstract)['model']
  finally:
    ckpt.close()
  return graphdef, model, checkpoint_step
