"""Sweeps: a list of experiments of a catalogue (configs/paper.py) x seeds x corpora, run one after
another in this process or printed as one train.py command per run for a cluster.

The catalogue is passed in (library code does not import configs/): any object with the attributes
of `Catalogue`, such as the configs/paper.py module itself.

A run lives in WORKROOT/<corpus>/<experiment>/seed<s> (WORKROOT/<corpus>/<experiment>/lr<lr>/
seed<s> with a learning-rate grid, each experiment trained at each rate). WORKROOT is a local path
or any etils.epath URL (gs://bucket/sweep): every file the sweep reads or writes goes through
etils.epath, a train.py subprocess's log included (`log_path`). A run is finished when its
metrics.jsonl holds an evaluation at the config's last step (train.num_steps); finished runs are
skipped, unfinished ones resume from their latest checkpoint (train_lib's usual resume). A workdir
whose config.json differs from the planned config is an error, never silently reused or
overwritten.

Seed s sets both config.seed (initialisation) and config.data.shuffle_seed (data order), and
nothing else depends on the experiment: every experiment's run of seed s sees the same batches and
starts from the same values of the weights the experiments share (the connections draw no random
numbers, so the model's random stream is the same; tests/test_sweep.py checks both). The runs of
one seed are therefore paired, and analysis/results.py reports paired differences.

Stopping: SIGTERM, or Ctrl-C twice, stops the sweep once the runs in training have saved a checkpoint
(train_lib saves and returns on SIGTERM; with jobs > 1 the sweep forwards SIGTERM to its train.py
processes, which ignore Ctrl-C themselves), and `execute` raises `Stopped`: running the same sweep
again resumes. The first Ctrl-C lets the runs in training finish and starts no other. A signal
that arrives while a run in this process is still starting (before its training loop) takes
effect when that run ends.

A corpus is 'stdlib' (the embedded corpus), or a text file or a glob of text files
(data.dataset='text_files', which splits train / validation by pieces of documents, so a single
file needs no special case).
"""

import ast
import dataclasses
import glob
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Protocol

from etils import epath
import ml_collections

from hyperconn_jax import cli, config_lib
from hyperconn_jax import paths
from hyperconn_jax import rundir
from hyperconn_jax import train_lib
from hyperconn_jax.data import builders
from hyperconn_jax.data import sources

RUN_FILE = 'sweep_run.json'
LOG_FILE = 'train.log'


class Catalogue(Protocol):
  """The experiments a sweep draws from; the configs/paper.py module is one."""
  # The catalogue's config file as train.py's --config takes it (for the printed commands).
  CONFIG_FILE: str
  # Experiment name -> its description (the sweep reads only the names; reports read `.about`).
  EXPERIMENTS: Mapping[str, Any]
  # Suite name -> its experiments, the baseline first.
  SUITES: Mapping[str, tuple[str, ...]]

  def get_config(self, arg: str) -> ml_collections.ConfigDict:
    """The config of 'experiment=E,size=S' (either may be left out)."""

  def defaults(self) -> ml_collections.ConfigDict:
    """Every config field's default (configs/base.py): what a field missing from an older run's
    config.json held."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A named dataset: the config.data overrides that select it."""
  name: str
  overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  catalogue: Catalogue = dataclasses.field(repr=False)
  corpus: Corpus
  experiment: str
  seed: int
  workdir: str
  size: str
  overrides: tuple[tuple[str, Any], ...] = ()  # Applied after the experiment's own config.
  lr: float | None = None  # optim.lr, applied last; None: the experiment's own.

  @property
  def config_arg(self) -> str:
    return f'experiment={self.experiment},size={self.size}'

  @property
  def lr_dirs(self) -> tuple[str, ...]:
    """The workdir's path part for the learning rate below the experiment: () or ('lr<lr>',)."""
    return () if self.lr is None else (f'lr{self.lr:g}',)

  @property
  def name(self) -> str:
    return '/'.join((self.corpus.name, self.experiment, *self.lr_dirs, f'seed{self.seed}'))

  def all_overrides(self) -> tuple[tuple[str, Any], ...]:
    lr = () if self.lr is None else (('optim.lr', self.lr),)
    return (('seed', self.seed), ('data.shuffle_seed', self.seed)) + self.corpus.overrides + \
        self.overrides + lr


def suite(name: str, catalogue: Catalogue) -> tuple[str, ...]:
  """The experiments of a suite of the catalogue, or a comma-separated list of experiments."""
  names = catalogue.SUITES.get(name, tuple(filter(None, name.split(','))))
  for exp in names:
    if exp not in catalogue.EXPERIMENTS:
      raise ValueError(f'--suite={name!r}: {exp!r} is neither a suite '
                       f'({", ".join(catalogue.SUITES)}) nor an experiment of '
                       f'{catalogue.CONFIG_FILE}')
  return names


def prepare_corpus(spec: str) -> Corpus:
  """'stdlib', one text file or a glob of text files (see the module docstring)."""
  if spec == 'stdlib':
    return Corpus('stdlib')
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isfile(path):
    name = os.path.splitext(os.path.basename(path))[0]
  elif glob.glob(path, recursive=True):
    name = os.path.basename(builders.glob_root(path)) or 'text'
  else:
    raise ValueError(f'--corpora entry {spec!r} is not stdlib, a text file, or a glob of text '
                     'files')
  return Corpus(name, (('data.dataset', 'text_files'), ('data.text_glob', path)))


def parse_overrides(items: list[str], catalogue: Catalogue,
                    size: str = 'cpu') -> tuple[tuple[str, Any], ...]:
  """'train.num_steps=100' items -> ((path, typed value), ...), typed like the config's field."""
  reference = catalogue.get_config(f'size={size}')
  out = []
  for item in items:
    path, sep, text = item.partition('=')
    path = path.strip().removeprefix('config.')
    if not sep:
      raise ValueError(f'--set {item!r}: expected path=value, e.g. train.num_steps=100')
    current = _get(reference, path)
    if isinstance(current, tuple):
      value = tuple(ast.literal_eval(text))
    else:
      value = config_lib.parse_arg(f'v={text}', v=current).v
    out.append((path, value))
  return tuple(out)


def _get(config, path: str):
  node = config
  for key in path.split('.'):
    if key not in node:
      raise ValueError(f'config has no field {path!r}')
    node = node[key]
  return node


def _set(config, path: str, value) -> None:
  *parents, leaf = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value


def plan(catalogue: Catalogue, experiments: tuple[str, ...], seeds: int, corpora: list[Corpus],
         workroot: str, *, size: str = 'cpu', overrides: tuple[tuple[str, Any], ...] = (),
         lr_grid: tuple[float, ...] = ()) -> list[Run]:
  """Every (corpus, experiment of the catalogue, learning rate of lr_grid, seed 0..seeds-1) run,
  corpus-major; an empty lr_grid trains each experiment at its own optim.lr."""
  for lr in lr_grid:
    if not lr > 0:
      raise ValueError(f'--lr_grid: {lr!r} is not a learning rate > 0')
  root = paths.as_path(workroot)
  runs = [Run(catalogue, corpus, exp, seed, '', size, overrides, lr) for corpus in corpora
          for exp in experiments for lr in (lr_grid or (None,)) for seed in range(seeds)]
  return [dataclasses.replace(run, workdir=os.fspath(root.joinpath(*run.name.split('/'))))
          for run in runs]


def make_config(run: Run):
  """The run's full, locked config."""
  config = run.catalogue.get_config(run.config_arg)
  for path, value in run.all_overrides():
    _set(config, path, value)
  return config


def train_args(run: Run, python: str = 'python', script: str = 'train.py') -> list[str]:
  """The train.py command line (argv) that performs `run`."""
  args = [python, script, f'--config={run.catalogue.CONFIG_FILE}:{run.config_arg}']
  for path, value in run.all_overrides():
    text = str(value) if not isinstance(value, bool) else str(value).lower()
    args.append(f'--config.{path}={text}')
  args.append(f'--workdir={run.workdir}')
  return args


def command(run: Run) -> str:
  """The shell command that performs `run` with train.py (for a cluster)."""
  return shlex.join(train_args(run))


def num_steps(workdir: str) -> int | None:
  """train.num_steps of the run in `workdir` (None before it wrote config.json)."""
  saved = _saved_config(workdir)
  return None if saved is None else saved['train']['num_steps']


def _saved_config(workdir: str) -> dict[str, Any] | None:
  path = paths.as_path(workdir) / rundir.CONFIG_FILE
  return rundir.read_json(path) if path.exists() else None


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _fields_that_matter(config, kinds: set[str]) -> dict[str, Any]:
  """The config's fields as {'a.b': value}, with the options of the connection kinds in `kinds`
  only (a kind reads only its own sub-config)."""
  tree = rundir.config_to_json(config)
  connection = tree['model']['connection']
  tree['model']['connection'] = {key: value for key, value in connection.items()
                                 if not isinstance(value, dict) or key in kinds}
  return _flatten(tree)


def config_mismatch(workdir: str, config, defaults) -> list[str]:
  """The config fields whose value in the run of WORKDIR differs from `config` ('a.b: saved ->
  planned'); [] when they agree or the run has not started.

  The run's config is read as rundir.load_run_config reads it: an older run's config.json is
  migrated to today's layout and the fields it lacks take their `defaults` (configs/base.py's).
  A connection kind's options are compared only when both use that kind.
  """
  if not (paths.as_path(workdir) / rundir.CONFIG_FILE).exists():
    return []
  run_config = rundir.load_run_config(workdir, defaults)
  kinds = {config.model.connection.kind} & {run_config.model.connection.kind}
  saved = _fields_that_matter(run_config, kinds)
  planned = _fields_that_matter(config, kinds)
  return [f'{key}: {saved.get(key, "(absent)")!r} -> {planned.get(key, "(absent)")!r}'
          for key in sorted(set(saved) | set(planned)) if saved.get(key) != planned.get(key)]


def is_finished(workdir: str) -> bool:
  """True when the run evaluated at its last step (train.num_steps)."""
  last = num_steps(workdir)
  return last is not None and any(r['step'] == last and 'eval_loss' in r
                                  for r in rundir.read_metrics(workdir))


def wall_time(workdir: str) -> float | None:
  """The training wall time WORKDIR/sweep_run.json records (None if it has none)."""
  path = paths.as_path(workdir) / RUN_FILE
  return rundir.read_json(path)['wall_s'] if path.exists() else None


def _record_wall_time(run: Run, wall_s: float) -> None:
  """Adds wall_s to WORKDIR/sweep_run.json (summed over the invocations that trained the run)."""
  rundir.write_json(paths.as_path(run.workdir) / RUN_FILE,
                    {'wall_s': (wall_time(run.workdir) or 0.0) + wall_s, 'command': command(run)})


def log_path(run: Run) -> epath.Path:
  """Where launch_train's train.py writes its output: WORKDIR/train.log on a local disk. An object
  store has no append, so for a URL workdir a local file, which `_save_log` appends to
  WORKDIR/train.log when the process has ended (a sweep that dies first leaves it there, and the
  next save of the run's log includes it)."""
  workdir = paths.as_path(run.workdir)
  if not paths.is_remote(workdir):
    return workdir / LOG_FILE
  key = hashlib.sha256(run.workdir.encode()).hexdigest()[:16]
  return epath.Path(tempfile.gettempdir()) / 'hyperconn_sweep_logs' / key / LOG_FILE


def _save_log(run: Run) -> None:
  """Appends the local log of a run with a URL workdir to WORKDIR/train.log (one write of the
  whole object) and deletes it; nothing to do for a local workdir or when there is no log."""
  staged = log_path(run)
  if not paths.is_remote(run.workdir) or not staged.exists():
    return
  target = paths.as_path(run.workdir) / LOG_FILE
  target.write_bytes((target.read_bytes() if target.exists() else b'') + staged.read_bytes())
  staged.unlink()
  staged.parent.rmdir()


def launch_train(run: Run) -> subprocess.Popen:
  """Starts train.py for `run` in a subprocess, its output appended to `log_path(run)`.

  The child does not preallocate accelerator memory, so several jobs can share one GPU, and
  ignores Ctrl-C (the terminal sends it to the whole process group): the sweep decides, and stops
  its children with SIGTERM, which makes them save a checkpoint first.
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  path = log_path(run)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('ab') as log_file:
    return subprocess.Popen(train_args(run, sys.executable, os.path.join(repo, 'train.py')),
                            cwd=repo, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            preexec_fn=_ignore_ctrl_c)


def _ignore_ctrl_c() -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Inherited: Python then installs no handler.


class Stopped(Exception):
  """The sweep stopped early on SIGTERM or Ctrl-C; `signum` is the signal (for the exit status).
  Running the same sweep again resumes it."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class _StopRequests:
  """SIGTERM and Ctrl-C handlers for the duration of a sweep (main thread only; elsewhere the
  signals keep their usual effect).

  after_run: stop once the runs in training end (the first Ctrl-C). now: stop the runs in
  training at their next step, after a checkpoint (SIGTERM, or the second Ctrl-C, which sends
  this process SIGTERM: that reaches train_lib's own handler during an in-process run).
  """

  def __init__(self, log):
    self.after_run = self.now = False
    self.signum = None
    self._log = log
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.after_run or self.now

  def __enter__(self):
    try:
      for signum, handler in ((signal.SIGTERM, self._term), (signal.SIGINT, self._interrupt)):
        self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # Not the main thread.
      pass
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _term(self, signum, frame):
    del frame
    self.now, self.signum = True, self.signum or signum
    self._log('SIGTERM: stopping the sweep once the runs in training have saved a checkpoint.')

  def _interrupt(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    if not self.after_run:
      self.after_run = True
      self._log('Ctrl-C: the sweep stops when the runs in training end. Ctrl-C again (or '
                'SIGTERM) stops them now, after a checkpoint.')
      return
    signal.signal(signal.SIGINT, signal.default_int_handler)  # A third Ctrl-C aborts.
    os.kill(os.getpid(), signal.SIGTERM)


def execute(runs: list[Run], *, jobs: int = 1,
            train_fn: Callable[[Any, str], Any] | None = None,
            launch_fn: Callable[[Run], subprocess.Popen] | None = None,
            log: Callable[[str], None] = print) -> dict[str, int]:
  """Trains the unfinished runs; returns counts {'skipped', 'trained'}.

  With jobs = 1 the runs train one after another in this process; with jobs > 1 up to `jobs`
  train.py subprocesses run at once (CPU cores or one GPU shared; not for TPUs, which one process
  holds). Each finished run gets WORKDIR/sweep_run.json with its wall time (summed over the
  invocations that trained it; with jobs > 1 the jobs share the machine, so it is longer than
  the run alone would take).

  Args:
    runs: from `plan`.
    jobs: runs trained at once.
    train_fn: (config, workdir) -> anything, for jobs = 1; default train_lib.train_and_evaluate.
    launch_fn: run -> a started subprocess, for jobs > 1. The default prepares each corpus's
      dataset once here (so the jobs do not race to build it), then uses `launch_train`.
    log: where progress lines go.

  Raises:
    cli.UsageError: jobs < 1, an invalid run config, or a workdir holding a run of another config
      (before anything trains).
    RuntimeError: with jobs > 1, after all runs ended, naming the runs whose process failed and
      their logs.
    Stopped: on SIGTERM or Ctrl-C (module docstring), once the runs in training have ended,
      naming the unfinished runs.
  """
  if jobs < 1:
    raise cli.UsageError(f'--jobs={jobs}: must be at least 1')
  counts = {'skipped': 0, 'trained': 0}
  todo, stale = [], []
  for i, run in enumerate(runs):
    name = f'[{i + 1}/{len(runs)}] {run.name}'
    config = make_config(run)
    with cli.usage_errors():
      config_lib.validate(config)
    mismatch = config_mismatch(run.workdir, config, run.catalogue.defaults())
    if mismatch:
      stale.append(f'{run.workdir}: ' + '; '.join(mismatch[:5]) +
                   (f'; and {len(mismatch) - 5} more' if len(mismatch) > 5 else ''))
    elif is_finished(run.workdir):
      log(f'{name}: finished, skipped')
      counts['skipped'] += 1
    else:
      todo.append((name, run, config))
  if stale:
    raise cli.UsageError('runs in these workdirs used another config than the sweep plans now '
                         '(their results would be mislabelled; use another --workroot or move '
                         'them away):\n  ' + '\n  '.join(stale))
  with _StopRequests(log) as stop:
    if jobs == 1:
      counts['trained'] = _train_in_process(todo, train_fn, log, stop)
    else:
      counts['trained'] = _train_in_subprocesses(todo, jobs, launch_fn, log, stop)
    unfinished = [name for name, run, _ in todo if not is_finished(run.workdir)]
    if stop.requested or unfinished:
      raise Stopped(f'the sweep stopped on {signal.Signals(stop.signum or signal.SIGTERM).name} '
                    f'with {len(unfinished)} of {len(runs)} runs unfinished: '
                    + ', '.join(unfinished), stop.signum or signal.SIGTERM)
  return counts


def _train_in_process(todo, train_fn, log, stop) -> int:
  """Trains the (name, run, config) of `todo` one after another until a run returns unfinished
  (train_lib stopped it on SIGTERM) or a stop is requested; returns how many finished."""
  train_fn = train_fn or train_lib.train_and_evaluate
  trained = 0
  for name, run, config in todo:
    if stop.requested:
      break
    log(f'{name}: training in {run.workdir}')
    start = time.perf_counter()
    train_fn(config, run.workdir)
    _record_wall_time(run, time.perf_counter() - start)
    if not is_finished(run.workdir):
      break
    trained += 1
  return trained


def _train_in_subprocesses(todo, jobs, launch_fn, log, stop) -> int:
  """Trains the (name, run, config) of `todo`, `jobs` subprocesses at a time; returns how many
  finished (RuntimeError naming the failed ones, once all ended). On a stop request no run
  starts, and on `stop.now` the running ones get SIGTERM (they save and exit)."""
  if launch_fn is None:
    prepared = set()
    for _, run, config in todo:
      if run.corpus.name not in prepared:
        sources.ensure_prepared(config)
        prepared.add(run.corpus.name)
    launch_fn = launch_train
  pending, running, failed, trained, signalled = list(todo), {}, [], 0, False
  while pending or running:
    if stop.requested:
      pending.clear()
    if stop.now and not signalled:
      for proc in running:
        proc.send_signal(signal.SIGTERM)
      signalled = True
    while pending and len(running) < jobs:
      name, run, _ = pending.pop(0)
      log(f'{name}: training in {run.workdir} (log: {log_path(run)})')
      running[launch_fn(run)] = (name, run, time.perf_counter())
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      name, run, start = running.pop(proc)
      _save_log(run)
      if proc.returncode == 0 and is_finished(run.workdir):
        _record_wall_time(run, time.perf_counter() - start)
        trained += 1
        log(f'{name}: finished in {time.perf_counter() - start:.0f} s')
      elif signalled and proc.returncode in (0, -signal.SIGTERM):
        # Stopped: saved its checkpoint (0), or ended before its training loop began.
        _record_wall_time(run, time.perf_counter() - start)
        log(f'{name}: stopped (log: {paths.as_path(run.workdir) / LOG_FILE})')
      else:
        failed.append(f'{name} (exit code {proc.returncode}; '
                      f'{paths.as_path(run.workdir) / LOG_FILE})')
        log(f'{name}: FAILED, exit code {proc.returncode}')
  if failed:
    raise RuntimeError(f'{len(failed)} of {len(todo)} runs failed:\n  ' + '\n  '.join(failed))
  return trained
