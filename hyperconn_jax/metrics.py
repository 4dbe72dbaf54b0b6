"""Run outputs on process 0: metrics.jsonl, TensorBoard events, a progress bar, the run's facts.

TensorBoard files are written with tensorboardX (no TensorFlow needed) to WORKDIR/tensorboard; the
files themselves and the workdir (local or a bucket) are rundir.py's.
On processes other than 0 every writer is a no-op, so callers never branch on the process index.
"""

import importlib.metadata
import json
import logging as std_logging
import os
import platform
import sys
import time
from typing import Any

from absl import logging
import jax
import tqdm

from hyperconn_jax import paths
from hyperconn_jax import rundir

def _jsonable(value: Any) -> Any:
  """Python scalars from numpy / jax scalars (JSON cannot hold numpy types)."""
  return value.item() if hasattr(value, 'item') else value


class MetricWriter:
  """Writes scalar rows to WORKDIR/metrics.jsonl and TensorBoard (process 0 only).

  On a bucket both are buffered (rundir.MetricsLog): they are written out at most every
  rundir.FLUSH_SECONDS, on `flush()` (each checkpoint) and on `close()`.
  """

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int | None = None):
    """Opens the writers.

    Args:
      workdir: the run's working directory (a local path or an epath URL).
      enabled: True on process 0; other processes write nothing.
      resume_step: when resuming from a checkpoint at this step, rows logged after it by the
        interrupted run are dropped from metrics.jsonl (they are about to be recomputed), so each
        step appears once.
    """
    self.enabled = enabled
    self._log = None
    self._tb = None
    if not enabled:
      return
    self._log = rundir.MetricsLog(workdir, resume_step)
    import tensorboardX  # pylint: disable=g-import-not-at-top  (only process 0 needs it)
    # tensorboardX writes gs:// itself (google-cloud-storage), re-uploading the whole event file
    # on every flush: flushed with the metrics log (and by its own timer at the same interval),
    # not after every row.
    self._tb = tensorboardX.SummaryWriter(
        os.fspath(paths.as_path(workdir) / rundir.TENSORBOARD_DIR),
        flush_secs=int(rundir.FLUSH_SECONDS),
        purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes one row {'step': step, **scalars}; each scalar also becomes a TensorBoard tag."""
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    for name, value in row.items():
      if name != 'step':
        self._tb.add_scalar(name, value, global_step=int(step))
    if self._log.write(row):
      self._tb.flush()

  def flush(self) -> None:
    """Writes out everything buffered."""
    if self.enabled:
      self._log.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._log.close()
      self._tb.close()


class Progress:
  """A tqdm bar (step, loss, tokens/s, ETA) on process 0, plus throughput bookkeeping."""

  def __init__(self, *, enabled: bool, start_step: int, num_steps: int):
    self._bar = (tqdm.tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                           file=sys.stderr) if enabled else None)
    self._last_time = self._last_update = time.perf_counter()
    self._tokens = 0.0
    self._steps = 0
    self._rate = None

  def update(self, step: int, loss: float, tokens: float) -> None:
    """Advances the bar to `step`, showing the loss of that step and a smoothed tokens/s."""
    now = time.perf_counter()
    rate = tokens / max(now - self._last_update, 1e-9)
    self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
    self._last_update = now
    self._tokens += tokens
    self._steps += 1
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f'{loss:.4f}', tok_per_s=f'{self._rate:.4g}', refresh=False)
      self._bar.refresh()

  def throughput(self) -> tuple[float, float]:
    """(tokens per second, updates per second) since the previous call (restarting the
    measurement)."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rates = self._tokens / elapsed, self._steps / elapsed
    self._last_time, self._tokens, self._steps = now, 0.0, 0
    return rates

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def library_versions() -> dict[str, str]:
  """Versions of the stack (python, jax, jaxlib, flax, optax, orbax, grain, numpy)."""
  versions = {'python': platform.python_version()}
  for dist in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy',
               'ml-collections', 'tensorflow-datasets'):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = 'not installed'
  return versions


def host_facts() -> dict[str, Any]:
  """This host: OS platform, CPU model and count."""
  cpu = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), cpu)
  except OSError:
    pass
  return {'platform': platform.platform(), 'cpu': cpu, 'cpu_count': os.cpu_count()}


def run_facts(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Library versions, host, devices and mesh of this run (JSON-able)."""
  return {
      'versions': library_versions(),
      'host': host_facts(),
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'mesh': dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
  }


def log_run_start(workdir: str, config_json: dict[str, Any], facts: dict[str, Any], *,
                  enabled: bool) -> None:
  """Logs the config and run facts, and writes WORKDIR/config.json and WORKDIR/run.json (the
  facts of the latest invocation; process 0 only)."""
  logging.info('Config:\n%s', json.dumps(config_json, indent=2))
  logging.info('Run: %s', json.dumps(facts))
  if enabled:
    rundir.write_run_start(workdir, config_json, facts)


class _DropInfoFrom(std_logging.Filter):
  """Drops log records below WARNING emitted from files under the given package directories."""

  def __init__(self, packages: tuple[str, ...]):
    super().__init__()
    self._markers = tuple(f'{os.sep}{p}{os.sep}' for p in packages)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        m in record.pathname for m in self._markers)


class _DropMessages(std_logging.Filter):
  """Drops log records whose message starts with one of the given prefixes."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self._prefixes = prefixes

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefixes)


def quiet_library_logs(packages: tuple[str, ...] = ('orbax', 'tensorflow_datasets')) -> None:
  """Hides the INFO chatter of `packages` (orbax logs ~40 lines per save) from absl's log output;
  their warnings and errors still show. Also hides two expected warnings repeated on every use:
  tfds's that our builders use a custom config (by design: it depends on the Python version or the
  user's files) and orbax's that a read-only manager (eval) does not save."""
  handler = logging.get_absl_handler()
  handler.addFilter(_DropInfoFrom(packages))
  handler.addFilter(_DropMessages((
      'Using custom data configuration', 'CheckpointManagerOptions.read_only=True',
      'Given directory is read only')))
