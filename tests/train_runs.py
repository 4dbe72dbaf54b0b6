"""train.py as subprocesses for the reliability and multi-process tests.

Every run trains configs/lm.py:size=tiny on a small text_files corpus with OVERRIDES (12 updates,
metrics every step, checkpoints at 4, 6 (eval), 8 and 12 (eval), all kept) through
tests/paced_train.py, so a test can slow the updates down and signal the process in the middle of
the run. data.num_shards=2 makes the global batches the same for one process with 8 devices and
two processes with 4 each.

The corpus, its prepared dataset and an uninterrupted reference run are made once per pytest
session (under the session's base temp directory) and shared by both test modules. Runs of the
same topology share a persistent XLA compilation cache, so only the first of them compiles.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import jax

import helpers
from configs import lm
from hyperconn_jax import checkpoint, data, paths, rundir, sharding, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/lm.py:size=tiny'
NUM_STEPS = 12
OVERRIDES = {
    'data.dataset': 'text_files',
    'data.shuffle_window': 16,
    'data.num_shards': 2,
    'train.num_steps': NUM_STEPS,
    'train.log_every': 1,
    'train.eval_every': 6,
    'train.checkpoint_every': 4,
    'checkpoint.keep_latest': 4,
}
# Any single run finishes well within this on a loaded 2-core machine; a hung one is killed.
RUN_TIMEOUT_S = 420


def overrides(corpus) -> dict:
  """OVERRIDES plus the corpus: (text glob, data_dir)."""
  return dict(OVERRIDES, **{'data.text_glob': corpus[0], 'data.data_dir': corpus[1]})


def make_config(corpus, **extra):
  """The locked config the subprocesses build from CONFIG and the overrides."""
  config = lm.get_config(CONFIG.partition(':')[2])
  with config.unlocked():
    for key, value in dict(overrides(corpus), **extra).items():
      *parents, leaf = key.split('.')
      node = config
      for name in parents:
        node = node[name]
      node[leaf] = value
  return config


def prepared_corpus(tmp_path_factory) -> tuple[str, str]:
  """(text glob, data_dir) of the session's corpus, prepared once (subprocesses only read it)."""
  root = tmp_path_factory.getbasetemp() / 'reliability_data'
  corpus = str(root / 'corpus' / '*.txt'), str(root / 'tfds')
  if not (root / 'ready').exists():
    helpers.write_corpus(str(root / 'corpus'))
    data.ensure_prepared(make_config(corpus))
    (root / 'ready').write_text('')
  return corpus


def cache_dir(tmp_path_factory, name: str) -> str:
  return str(tmp_path_factory.getbasetemp() / 'reliability_jax_cache' / name)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(corpus, workdir, log_path, *, jax_cache: str, num_devices: int = 8,
          step_delay: float = 0.0, process: tuple[str, int, int] | None = None,
          extra_flags: tuple[str, ...] = ()) -> subprocess.Popen:
  """Starts paced_train.py; stdout and stderr (absl logs) go to log_path.

  Args:
    corpus: (text glob, data_dir).
    workdir: the run's --workdir.
    log_path: file for the process's output.
    jax_cache: persistent compilation cache directory (one per topology and process).
    num_devices: simulated CPU devices of this process.
    step_delay: seconds slept before each update.
    process: (coordinator address, number of processes, process id) for a multi-process run.
    extra_flags: more train.py flags.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(num_devices),
             JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  argv = [sys.executable, os.path.join(REPO, 'tests', 'paced_train.py'), f'--config={CONFIG}',
          *(f'--config.{k}={v}' for k, v in overrides(corpus).items()),
          f'--workdir={workdir}', f'--step_delay={step_delay}', *extra_flags]
  if process is not None:
    address, count, index = process
    argv += [f'--coordinator_address={address}', f'--num_processes={count}',
             f'--process_id={index}']
  with open(log_path, 'w') as log:
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(log_path, lines: int = 30) -> str:
  with open(log_path) as f:
    return ''.join(f.readlines()[-lines:])


def wait(proc: subprocess.Popen, log_path, timeout: float = RUN_TIMEOUT_S) -> int:
  """Waits for the process (killing it after `timeout` seconds); returns its exit code."""
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f'run timed out after {timeout} s:\n{log_tail(log_path)}') from None


def wait_all(procs, log_paths, timeout: float = RUN_TIMEOUT_S) -> None:
  """Waits for processes that depend on each other to exit 0. As soon as one fails, the others
  (which would hang in collectives until a distributed timeout) are killed and AssertionError
  shows the logs."""
  deadline = time.monotonic() + timeout
  while True:
    codes = [proc.poll() for proc in procs]
    failed = any(code not in (None, 0) for code in codes)
    if not failed and None not in codes:
      return
    if failed or time.monotonic() > deadline:
      kill_all(procs)
      tails = '\n'.join(log_tail(path) for path in log_paths)
      raise AssertionError(f'exit codes {codes}'
                           f'{"" if failed else f" (timed out after {timeout} s)"}:\n{tails}')
    time.sleep(0.1)


def kill_all(procs) -> None:
  """SIGKILLs those of `procs` (started by this test) that are still running."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def forget_listings(workdir) -> None:
  """Drops gcsfs's cached bucket listings: it caches them without expiry, so this process would
  not see what the train.py subprocesses wrote to the bucket since it last looked."""
  if paths.is_remote(workdir):
    filesystem = fsspec.get_filesystem_class(str(workdir).split('://')[0])
    for instance in list(filesystem._cache.values()):  # pylint: disable=protected-access
      instance.invalidate_cache()


def rows(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl ([] if it does not exist yet; a bucket's is buffered)."""
  if paths.is_remote(workdir):
    forget_listings(workdir)
    return rundir.read_metrics(workdir)
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def train_losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in rows(workdir) if 'loss' in r}


def eval_losses(workdir) -> dict[int, float]:
  return {r['step']: r['eval_loss'] for r in rows(workdir) if 'eval_loss' in r}


def finalized_steps(workdir) -> list[int]:
  """Checkpoint steps whose save finished (orbax renames a step directory when it is complete on
  a local disk; on a bucket it writes the commit marker last)."""
  forget_listings(workdir)
  directory = paths.as_path(workdir) / 'checkpoints'
  try:
    entries = list(directory.iterdir())
  except FileNotFoundError:
    # Not created yet; or, in a bucket, gone again with its only object (the run's write
    # probe, rundir.ensure_writable): one listing, as an exists() check before it could race.
    return []
  remote = paths.is_remote(workdir)
  return sorted(int(p.name) for p in entries
                if p.name.isdigit() and (not remote or (p / 'commit_success.txt').exists()))


def wait_until(condition, procs, what: str, log_path, timeout: float = RUN_TIMEOUT_S) -> None:
  """Polls `condition()` every 20 ms while all `procs` run; fails if one exits or time runs out."""
  deadline = time.monotonic() + timeout
  while not condition():
    for proc in procs:
      if proc.poll() is not None:
        raise AssertionError(f'the run exited ({proc.returncode}) before {what}:\n'
                             f'{log_tail(log_path)}')
    if time.monotonic() > deadline:
      raise AssertionError(f'timed out waiting for {what}:\n{log_tail(log_path)}')
    time.sleep(0.02)


def send(proc: subprocess.Popen, sig: signal.Signals) -> None:
  os.kill(proc.pid, sig)


def reference_run(tmp_path_factory) -> str:
  """Workdir of an uninterrupted single-process run on 8 devices (made once per session)."""
  root = tmp_path_factory.getbasetemp() / 'reliability_reference'
  workdir = str(root / 'run')
  if not (root / 'done').exists():
    root.mkdir(exist_ok=True)
    corpus = prepared_corpus(tmp_path_factory)
    log_path = str(root / 'log.txt')
    proc = start(corpus, workdir, log_path, jax_cache=cache_dir(tmp_path_factory, 'single8'))
    try:
      assert wait(proc, log_path) == 0, log_tail(log_path)
    finally:
      kill_all([proc])
    assert sorted(train_losses(workdir)) == list(range(1, NUM_STEPS + 1))
    (root / 'done').write_text('')
  return workdir


def restore_state(config, workdir, step: int):
  """The model and optimizer state of a checkpoint, restored on this process's 8 devices (host
  numpy arrays)."""
  forget_listings(workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
    try:
      restored = ckpt.restore(step, model=setup.abstract_model, opt_state=setup.abstract_opt_state)
    finally:
      ckpt.close()
  return jax.device_get(restored)
