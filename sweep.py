"""Runs a suite of configs/paper.py experiments x seeds x corpora, then writes results tables
(markdown, CSV), loss curves and analyses (PNG), and optionally the markdown report.

  python sweep.py --suite=hc_table1 --seeds=3 --size=cpu --workroot=workdirs/hc_table1
  python sweep.py --suite=hc_table1 --size=paper --print_commands   # one train.py line per run
  python sweep.py --suite=dhc4,mhc4 --seeds=2 --set=train.num_steps=100 --workroot=/tmp/sw
  python sweep.py --suite=report --jobs=12 ...   # 12 train.py processes at once (e.g. one GPU)
  python sweep.py --suite=mhc_vs_hc --lr_grid=1e-3,3e-3,6e-3 ...   # each variant at its best lr
  python sweep.py --suite=depth --lr_grid=1e-3,3e-3 --lr_grid_seeds=1 ...  # the grid on seed 0 only

The report (docs/results.md; hours on a 2-core CPU):

  python sweep.py --suite=report --seeds=3 --size=cpu \
    --corpora=stdlib,/path/to/tinyshakespeare.txt --workroot=workdirs/report \
    --out=docs/results --report=docs/results.md

Runs go to WORKROOT/<corpus>/<experiment>/seed<s> (WORKROOT, --out and --report may be gs:// or
any etils.epath URL); finished runs are skipped and unfinished ones resume, so the same command
continues an interrupted sweep. SIGTERM or a second Ctrl-C stops the sweep after the runs in
training have saved a checkpoint (the first Ctrl-C: after they finish) and prints that command.
With --print_commands nothing is trained: run the printed commands anywhere (they share
WORKROOT), then run the sweep command again without --print_commands to collect the results (with
--lr_grid_seeds, it prints the grid's runs first and, once they finished, the other seeds'). A
corpus is 'stdlib', a text file or a glob of text files (data.dataset='text_files'; local).
"""

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging

from hyperconn_jax import cli
from hyperconn_jax import host_malloc
from hyperconn_jax import metrics
from hyperconn_jax import paths

_SUITE = flags.DEFINE_string('suite', None, 'A suite of configs/paper.py SUITES, or a comma-'
                             'separated list of experiments (the first is the baseline).',
                             required=True)
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per experiment (0 .. seeds-1).')
_SIZE = flags.DEFINE_enum('size', 'cpu', ['tiny', 'cpu', 'paper'], 'configs/paper.py size.')
_CORPORA = flags.DEFINE_list('corpora', ['stdlib'], "Datasets: 'stdlib', a text file (split into "
                             'parts) or a glob of text files.')
_WORKROOT = flags.DEFINE_string('workroot', None, 'Root of the runs\' workdirs (default '
                                'workdirs/sweeps/<suite>).')
_SET = flags.DEFINE_multi_string('set', [], "Config overrides for every run, e.g. "
                                 "--set=train.num_steps=100 (repeatable).")
_LR_GRID = flags.DEFINE_list('lr_grid', [], 'Learning rates (e.g. 1e-3,3e-3,6e-3): every experiment '
                             'trains at each; the tables report each experiment at its best rate '
                             '(lowest final validation loss averaged over the seeds every rate '
                             "has). Empty: each experiment's own optim.lr.")
_LR_GRID_SEEDS = flags.DEFINE_integer('lr_grid_seeds', 0, 'With --lr_grid: train the grid on '
                                      'seeds 0 .. lr_grid_seeds-1 only, then the other seeds at '
                                      "each experiment's best rate on those seeds (0: the grid on "
                                      'every seed).')
_JOBS = flags.DEFINE_integer('jobs', 1, 'Runs trained at once, each a train.py subprocess '
                            'logging to WORKDIR/train.log (CPU cores or one shared GPU; 1 trains '
                            'in this process).')
_TRAIN = flags.DEFINE_bool('train', True, 'Train the unfinished runs first. --notrain: only '
                           'report on the runs that finished (a sweep stopped part-way; the '
                           'tables count the seeds they have).')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one train.py command per unfinished '
                           'run and exit (with --lr_grid_seeds: the grid\'s runs until they '
                           'finished, then the other seeds\').')
_OUT = flags.DEFINE_string('out', None, 'Directory for tables, plots and analyses (default '
                           'WORKROOT/results).')
_REPORT = flags.DEFINE_string('report', '', 'Also write the markdown report here '
                              '(e.g. docs/results.md).')
_ANALYZE = flags.DEFINE_bool('analyze', True, 'Analyse seed 0 of each experiment (collapse, gain, '
                             'connection matrices).')
_ANALYSIS_BATCHES = flags.DEFINE_integer('analysis_batches', 4, 'Validation batches per '
                                         'analysis.')
_DEPTH = flags.DEFINE_string('depth', '', 'Also write the depth study here (analysis/depth.py: '
                             'loss, collapse, per-layer gradient norms and Amax gain against '
                             'model.num_layers; <dir>/<corpus>/depth.md and plots), e.g. '
                             'docs/results/depth for --suite=depth.')
_DISCUSSION = flags.DEFINE_string('discussion', '', 'A markdown file whose text goes into the '
                                  "report's Discussion section (the author's reading of it).")
_NOTE = flags.DEFINE_string('note', '', 'A sentence added to the report\'s setup (e.g. that the '
                            'machine was shared).')


def _analyze(collected, out_dir, defaults):
  """Analyses the first seed of every experiment (at its best learning rate) per corpus (reusing
  what an earlier invocation wrote into out_dir); returns ({corpus: PNG paths}, {corpus: tokens}).
  `defaults`: configs/base.py's config (for rundir.load_run_config).
  """
  from hyperconn_jax import checkpoint, sweep  # pylint: disable=g-import-not-at-top
  from hyperconn_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  files, tokens = {}, {}
  for corpus, by_exp in collected.items():
    results = {}
    corpus_dir = os.fspath(paths.as_path(out_dir) / corpus)
    for exp, runs in by_exp.items():
      if not runs:
        continue
      run = runs[0]['run']
      step = sweep.num_steps(run.workdir)  # A finished run's last checkpoint.
      exp_dir = _analysis_dir(corpus_dir, exp, run)
      source = checkpoint.fingerprint(run.workdir, step)
      r = runner.read_written(exp_dir, str(step), source=source) or runner.analyze_checkpoint(
          run.workdir, step, defaults=defaults, num_batches=_ANALYSIS_BATCHES.value,
          out_dir=exp_dir, label=exp)
      results[exp] = r
      tokens[corpus] = r['num_tokens']
      files.setdefault(corpus, []).extend(p for p in r['files'] if p.endswith('.png'))
    compare = runner.compare(results, corpus_dir)
    files[corpus] = [p for p in compare if p.endswith('.png')] + files.get(corpus, [])
  return files, tokens


def _analysis_dir(corpus_dir: str, experiment: str, run) -> str:
  return os.fspath(paths.as_path(corpus_dir).joinpath('analysis', experiment, *run.lr_dirs))


def _depth(best_by_corpus, out_dir, baseline: str, defaults) -> None:
  """Writes the depth study of each corpus into <--depth>/<corpus> (the analyses themselves go
  where _analyze puts them, which reuses them); `baseline` is an experiment of the baseline
  variant, `defaults` configs/base.py's config."""
  from hyperconn_jax.analysis import depth  # pylint: disable=g-import-not-at-top
  for corpus, best in best_by_corpus.items():
    dirs = {exp: _analysis_dir(os.fspath(paths.as_path(out_dir) / corpus), exp, runs[0]['run'])
            for exp, runs in best.items() if runs}
    measured = depth.measure(best, dirs, defaults=defaults, num_batches=_ANALYSIS_BATCHES.value,
                             log=logging.info)
    variant = depth.variant_and_depth(baseline, best[baseline][0]['config'])[0]
    rows = depth.table_rows(best, measured, baseline=variant)
    files = depth.write(rows, measured, best, os.fspath(paths.as_path(_DEPTH.value) / corpus),
                        variant)
    print(f'\nDepth ({corpus}):\n{depth.markdown_table(rows, variant)}\nFiles: {", ".join(files)}')


def _read(path: str) -> str:
  """The text of the file at `path` (a local path or a URL; '' for no path)."""
  return paths.as_path(path).read_text(encoding='utf-8').strip() if path else ''


def _lr_grid(items: list[str]) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in items)
  except ValueError:
    raise app.UsageError(f'--lr_grid={",".join(items)}: expected comma-separated numbers, e.g. '
                         '1e-3,3e-3,6e-3') from None


def _execute(runs, command: str) -> bool:
  """Trains the unfinished runs (with --notrain, nothing); returns True. With --print_commands,
  prints their commands instead, and returns whether there were none."""
  from hyperconn_jax import sweep  # pylint: disable=g-import-not-at-top
  if _PRINT.value:
    unfinished = [run for run in runs if not sweep.is_finished(run.workdir)]
    for run in unfinished:
      print(sweep.command(run))
    return not unfinished
  if not _TRAIN.value:
    return True
  try:
    counts = sweep.execute(runs, jobs=_JOBS.value, log=logging.info)
  except sweep.Stopped as e:
    print(f'{e}.\nTo resume, run the same command again (finished runs are skipped, stopped ones '
          f'resume from their latest checkpoint):\n  {command}', file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)  # As a shell reports a process ended by that signal.
  logging.info('Sweep: %d trained, %d already finished.', counts['trained'], counts['skipped'])
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from configs import base  # pylint: disable=g-import-not-at-top
  host_malloc.configure(base.get_config().train.host_malloc)  # Before JAX starts threads.
  metrics.quiet_library_logs()
  from configs import paper  # pylint: disable=g-import-not-at-top
  from hyperconn_jax import sweep  # pylint: disable=g-import-not-at-top
  from hyperconn_jax.analysis import results  # pylint: disable=g-import-not-at-top
  from hyperconn_jax.models import sizes  # pylint: disable=g-import-not-at-top

  if _DISCUSSION.value and not paths.as_path(_DISCUSSION.value).is_file():
    raise app.UsageError(f'--discussion={_DISCUSSION.value!r} is not a file')
  workroot = _WORKROOT.value or os.path.join('workdirs', 'sweeps', _SUITE.value.replace(',', '_'))
  lr_grid = _lr_grid(_LR_GRID.value)
  grid_seeds = min(_LR_GRID_SEEDS.value, _SEEDS.value) if lr_grid and _LR_GRID_SEEDS.value > 0 \
      else _SEEDS.value
  with cli.usage_errors():
    if _LR_GRID_SEEDS.value < 0:
      raise ValueError(f'--lr_grid_seeds={_LR_GRID_SEEDS.value}: must be >= 0')
    experiments = sweep.suite(_SUITE.value, paper)
    corpora = [sweep.prepare_corpus(spec) for spec in _CORPORA.value]
    overrides = sweep.parse_overrides(_SET.value, paper, _SIZE.value)
    runs = sweep.plan(paper, experiments, grid_seeds, corpora, workroot, size=_SIZE.value,
                      overrides=overrides, lr_grid=lr_grid)
  command = shlex.join(['python', 'sweep.py'] + sys.argv[1:])
  if not _execute(runs, command):
    return  # Commands printed: the grid first.
  if grid_seeds < _SEEDS.value:
    # The other seeds at each experiment's best rate on the grid's seeds (the same protocol
    # results.at_best_lr reports by).
    for corpus in corpora:
      best, _ = results.at_best_lr(results.collect(
          [r for r in runs if r.corpus == corpus])[corpus.name])
      for exp in (e for e in experiments if best[e]):  # --notrain: those with finished runs.
        runs += [r for r in sweep.plan(paper, (exp,), _SEEDS.value, [corpus], workroot,
                                       size=_SIZE.value, overrides=overrides,
                                       lr_grid=(best[exp][0]['lr'],))
                 if r.seed >= grid_seeds]
    _execute(runs, command)
  if _PRINT.value:
    return

  collected = results.collect(runs)
  out_dir = _OUT.value or os.fspath(paths.as_path(workroot) / 'results')
  baseline = experiments[0]
  about = {e: paper.EXPERIMENTS[e].about for e in experiments}
  first = {}
  for run in runs:
    first.setdefault(run.experiment, run)
  params = {e: sizes.param_counts(sweep.make_config(run).model) for e, run in first.items()}
  corpus_results = {}
  for corpus, by_exp in collected.items():
    corpus_results[corpus] = results.write_corpus_results(corpus, by_exp, baseline, about, params,
                                                          out_dir)
    print(f'\n{corpus}:\n{corpus_results[corpus]["table"]}\n{corpus_results[corpus]["lr_table"]}')
  best_by_corpus = {corpus: result['best'] for corpus, result in corpus_results.items()}
  if _DEPTH.value:
    _depth(best_by_corpus, out_dir, baseline, paper.defaults())
  analysis_files, analysis_tokens = ({}, {})
  if _ANALYZE.value:
    analysis_files, analysis_tokens = _analyze(best_by_corpus, out_dir, paper.defaults())
  if _REPORT.value:
    results.write_report(_REPORT.value, command=command, collected=collected,
                         corpus_results=corpus_results, analysis_files=analysis_files,
                         baseline=baseline, about=about, params=params,
                         analysis_tokens=analysis_tokens, note=_NOTE.value,
                         discussion=_read(_DISCUSSION.value))
    print(f'Report: {_REPORT.value}')
  print(f'Tables and plots: {out_dir}')


if __name__ == '__main__':
  cli.run(main)
