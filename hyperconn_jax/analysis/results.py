"""Sweep results: per-run facts from the workdirs, tables over seeds, loss curves, the report.

Seed s gives every variant the same data order and the same initial values of the weights they
share (hyperconn_jax/sweep.py), so a variant's run and the baseline's run of one seed are a pair.
Table math (per variant, over its seeds): mean, sample standard deviation (ddof = 1; 0 for one
seed); the paired difference to the baseline, mean over the seeds both have of (variant -
baseline), and its paired standard error std(differences, ddof = 1) / sqrt(pairs); beside it the
unpaired (Welch) standard error sqrt(s_v^2 / n_v + s_b^2 / n_b). A difference is called real only
when it exceeds twice the paired standard error; with fewer than two pairs no spread is known.

With a learning-rate grid, each variant is reported at its own best rate: the one with the lowest
final validation loss averaged over that rate's seeds (`at_best_lr`).

Every path (workdirs, the output directory, the report) is a local path or an etils.epath URL
(gs://...); each file is written whole in one request.
"""

import csv
import datetime
import io
import math
import os
import posixpath
from typing import Any

import numpy as np

from hyperconn_jax import paths, rundir, sweep
from hyperconn_jax.analysis import plots

METRICS = ('eval_loss', 'eval_bits_per_byte', 'eval_ppl')
SEED_FIELDS = ('corpus', 'variant', 'lr', 'seed') + METRICS + ('wall_s',)


def read_run(run: sweep.Run) -> dict[str, Any]:
  """Facts of one finished run: final eval metrics, loss curves, tokens seen, wall time, config.

  Returns {'run', 'seed', 'lr', 'config', 'final': {metric: value}, 'train': (steps, losses),
  'eval': (steps, losses), 'tokens_seen', 'wall_s' (None if unknown), 'facts' (WORKDIR/run.json:
  where it trained; None if absent)}.
  """
  rows = rundir.read_metrics(run.workdir)
  config = rundir.read_json(paths.as_path(run.workdir) / rundir.CONFIG_FILE)
  last = config['train']['num_steps']
  final = [r for r in rows if r['step'] == last and 'eval_loss' in r]
  if not final:
    raise ValueError(f'{run.workdir}: the run is not finished (no evaluation at step {last})')
  wall_s = sweep.wall_time(run.workdir)
  facts = rundir.read_run_facts(run.workdir)
  train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  evals = [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]
  return {
      'run': run, 'seed': run.seed, 'lr': config['optim']['lr'], 'config': config,
      'final': {k: final[-1][k] for k in METRICS},
      'train': tuple(map(list, zip(*train))) if train else ([], []),
      'eval': tuple(map(list, zip(*evals))) if evals else ([], []),
      'tokens_seen': last * config['train']['batch_size'] * config['data']['seq_len'],
      'eval_tokens': final[-1].get('eval_tokens'),
      'wall_s': wall_s,
      'facts': facts,
  }


def collect(runs: list[sweep.Run]) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """{corpus: {experiment: [read_run of each finished seed]}}, in plan order; unfinished runs are
  left out (the report counts the seeds it has)."""
  out: dict[str, dict[str, list]] = {}
  for run in runs:
    by_exp = out.setdefault(run.corpus.name, {})
    seeds = by_exp.setdefault(run.experiment, [])
    if sweep.is_finished(run.workdir):
      seeds.append(read_run(run))
  return out


def summarize(values: dict[str, dict[int, float]], baseline: str) -> list[dict[str, Any]]:
  """Per variant (in order) from {variant: {seed: value}}: n, mean, std, pairs (the seeds it shares
  with the baseline, sorted), diff (paired: mean of variant - baseline over the pairs), diff_se
  (paired), unpaired_diff (mean - baseline mean) and unpaired_se (Welch); see the module doc.

  Variants without values get n = 0 and NaN statistics; a spread needs two values (or pairs).
  """
  def stats(v):
    v = np.asarray(v, np.float64)
    if not len(v):
      return 0, math.nan, math.nan
    return len(v), float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

  base = values.get(baseline, {})
  n_b, mean_b, std_b = stats(list(base.values()))
  rows = []
  for name, by_seed in values.items():
    n, mean, std = stats(list(by_seed.values()))
    pairs = sorted(set(by_seed) & set(base))
    n_d, mean_d, std_d = stats([by_seed[s] - base[s] for s in pairs])
    rows.append({'variant': name, 'n': n, 'mean': mean, 'std': std, 'pairs': pairs,
                 'diff': mean_d, 'diff_se': std_d / math.sqrt(n_d) if n_d > 1 else math.nan,
                 'unpaired_diff': mean - mean_b,
                 'unpaired_se': (math.sqrt(std ** 2 / n + std_b ** 2 / n_b) if n > 1 and n_b > 1
                                 else math.nan)})
  return rows


def verdict(row: dict[str, Any], baseline: str) -> str:
  """What the seed spread says about one variant's difference to the baseline."""
  if row['variant'] == baseline:
    return 'baseline'
  if row['n'] == 0:
    return 'no finished runs'
  if math.isnan(row['diff_se']):
    return 'one paired seed: spread unknown'
  if row['diff'] < -2 * row['diff_se']:
    return 'lower (beyond 2 SE)'
  if row['diff'] > 2 * row['diff_se']:
    return 'higher (beyond 2 SE)'
  return 'within 2 SE (seed noise)'


def _pm(mean: float, spread: float, n: int, digits: int = 4) -> str:
  """'mean ± spread', or the mean alone from one seed (no spread), or 'n/a' from none."""
  if n == 0 or math.isnan(mean):
    return 'n/a'
  return f'{mean:.{digits}f}' if n < 2 else f'{mean:.{digits}f} ± {spread:.{digits}f}'


def seed_rows(corpus: str, by_exp: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One row per run (SEED_FIELDS): the per-seed final metrics the tables are computed from."""
  return [{'corpus': corpus, 'variant': exp, 'lr': r['lr'], 'seed': r['seed'],
           **r['final'], 'wall_s': r['wall_s']} for exp, runs in by_exp.items() for r in runs]


def read_seed_csv(path: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """{corpus: {experiment: [run]}} from a runs_<corpus>.csv of `write_corpus_results`, each run
  with the 'seed', 'lr', 'final', 'wall_s' and 'tokens_seen' (None) that `at_best_lr` and
  `table_rows` read: the tables again without the workdirs."""
  out: dict[str, dict[str, list]] = {}
  for row in csv.DictReader(io.StringIO(paths.as_path(path).read_text(), newline='')):
    out.setdefault(row['corpus'], {}).setdefault(row['variant'], []).append({
        'seed': int(row['seed']), 'lr': float(row['lr']),
        'final': {k: float(row[k]) for k in METRICS},
        'wall_s': float(row['wall_s']) if row['wall_s'] else None, 'tokens_seen': None})
  return out


def at_best_lr(by_exp: dict[str, list[dict[str, Any]]]
               ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[float, float]]]:
  """Each experiment's runs at its best learning rate, and {experiment: {lr: mean}} for every rate
  it has runs of: the mean final validation loss over the seeds every rate of the experiment has
  (all of them with a full grid; seed 0 after sweep.py --lr_grid_seeds=1, whose other seeds ran at
  the best rate only), the lowest mean being the best rate."""
  best, means = {}, {}
  for exp, runs in by_exp.items():
    by_lr = {}
    for r in runs:
      by_lr.setdefault(r['lr'], []).append(r)
    common = set.intersection(*[{r['seed'] for r in rs} for rs in by_lr.values()]) if by_lr \
        else set()
    means[exp] = {lr: float(np.mean([r['final']['eval_loss'] for r in rs if r['seed'] in common]))
                  for lr, rs in sorted(by_lr.items())}
    best[exp] = by_lr[min(means[exp], key=means[exp].get)] if by_lr else []
  return best, means


def table_rows(by_exp: dict[str, list[dict[str, Any]]], baseline: str) -> list[dict[str, Any]]:
  """One row per experiment (its runs at one learning rate each): loss / bits-per-byte
  statistics, paired and unpaired difference to the baseline, verdict, tokens, wall time."""
  def values(metric):
    return summarize({e: {r['seed']: r['final'][metric] for r in runs}
                      for e, runs in by_exp.items()}, baseline)

  rows = []
  for l, b in zip(values('eval_loss'), values('eval_bits_per_byte')):
    runs = by_exp[l['variant']]
    walls = [r['wall_s'] for r in runs if r['wall_s'] is not None]
    rows.append({
        'variant': l['variant'], 'lr': runs[0]['lr'] if runs else math.nan, 'seeds': l['n'],
        'paired_seeds': ' '.join(map(str, l['pairs'])),
        'eval_loss_mean': l['mean'], 'eval_loss_std': l['std'],
        'diff': l['diff'], 'diff_se': l['diff_se'],
        'unpaired_diff': l['unpaired_diff'], 'unpaired_se': l['unpaired_se'],
        'verdict': verdict(l, baseline),
        'bpb_mean': b['mean'], 'bpb_std': b['std'],
        'tokens_seen': runs[0]['tokens_seen'] if runs else None,
        'wall_s_mean': float(np.mean(walls)) if walls else math.nan,
    })
  return rows


def _diff(diff: float, se: float) -> str:
  if math.isnan(diff):
    return 'n/a'
  return f'{diff:+.4f}' + ('' if math.isnan(se) else f' ± {se:.4f}')


def markdown_table(rows: list[dict[str, Any]], about: dict[str, str],
                   params: dict[str, dict[str, int]]) -> str:
  """The results table in markdown."""
  lines = ['| variant | what | lr | seeds (paired) | params (connection) | eval loss | '
           'Δ loss vs baseline, paired | unpaired Δ | verdict | bits / byte | wall s / run |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    p = params.get(r['variant'])
    p_text = f'{p["total"]:,} ({p["connection"]:,})' if p else 'n/a'
    base = r['verdict'] == 'baseline'
    diff = '—' if base else _diff(r['diff'], r['diff_se'])
    unpaired = '—' if base else _diff(r['unpaired_diff'], r['unpaired_se'])
    seeds = f'{r["seeds"]}' + ('' if base else f' ({r["paired_seeds"] or "none"})')
    wall = 'n/a' if math.isnan(r['wall_s_mean']) else f'{r["wall_s_mean"]:.0f}'
    lines.append(f'| {r["variant"]} | {about.get(r["variant"], "")} | {r["lr"]:g} | {seeds} | '
                 f'{p_text} | {_pm(r["eval_loss_mean"], r["eval_loss_std"], r["seeds"])} | '
                 f'{diff} | {unpaired} | {r["verdict"]} | '
                 f'{_pm(r["bpb_mean"], r["bpb_std"], r["seeds"])} | {wall} |')
  return '\n'.join(lines)


def lr_table(means: dict[str, dict[float, float]]) -> str:
  """Mean final validation loss per experiment and learning rate, the best in bold (markdown)."""
  rates = sorted({lr for by_lr in means.values() for lr in by_lr})
  lines = ['| variant | ' + ' | '.join(f'lr {lr:g}' for lr in rates) + ' |',
           '|---|' + '---|' * len(rates)]
  for exp, by_lr in means.items():
    best = min(by_lr, key=by_lr.get) if by_lr else None
    cells = ['n/a' if lr not in by_lr else
             f'**{by_lr[lr]:.4f}**' if lr == best else f'{by_lr[lr]:.4f}' for lr in rates]
    lines.append(f'| {exp} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_csv(rows: list[dict[str, Any]], path: str, fields=None) -> None:
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=list(fields or rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  paths.as_path(path).write_text(text.getvalue())


def curves(by_exp: dict[str, list[dict[str, Any]]]) -> dict[str, dict]:
  """Loss curves for plots.loss_curves: per experiment, the steps every seed logged."""
  out = {}
  for exp, runs in by_exp.items():
    if not runs:
      continue
    entry = {}
    for key in ('train', 'eval'):
      steps = sorted(set.intersection(*[set(r[key][0]) for r in runs]))
      values = [[dict(zip(*r[key]))[s] for s in steps] for r in runs]
      entry[key] = (steps, values)
    out[exp] = entry
  return out


def describe_machine(facts: dict[str, Any] | None) -> str:
  """One line on the machine and stack a run trained on, from its run.json facts."""
  if facts is None:
    return 'unknown (the run has no run.json)'
  host, v = facts.get('host', {}), facts['versions']
  return (f'{host.get("cpu", "unknown CPU")} ({host.get("cpu_count", "?")} cores), '
          f'{host.get("platform", "unknown OS")}; {facts["device_count"]} x '
          f'{facts["device_kind"]} ({facts["backend"]}); Python {v["python"]}, JAX {v["jax"]}, '
          f'flax {v["flax"]}, optax {v["optax"]}, orbax-checkpoint {v["orbax-checkpoint"]}, '
          f'grain {v["grain"]}')


def machines(collected: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, int]:
  """{machine description: number of runs trained there}, over all collected runs."""
  out = {}
  for by_exp in collected.values():
    for runs in by_exp.values():
      for r in runs:
        key = describe_machine(r['facts'])
        out[key] = out.get(key, 0) + 1
  return out


def write_corpus_results(corpus: str, by_exp: dict[str, list[dict[str, Any]]], baseline: str,
                         about: dict[str, str], params: dict[str, dict[str, int]],
                         out_dir: str) -> dict[str, Any]:
  """Writes into out_dir: results_<corpus>.md (the table, each experiment at its best learning
  rate, and the learning-rate table when there are several rates) and .csv (the table's rows),
  runs_<corpus>.csv (every run's final metrics: `read_seed_csv` regenerates the tables from it)
  and loss_<corpus>.png.

  Args:
    by_exp: {experiment: runs}, from `collect` (any number of learning rates).
  Returns:
    {'rows', 'table' (markdown), 'lr_table' (markdown; '' with one rate), 'best' ({experiment:
    its runs at its best rate}), 'files'}.
  """
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  best, lr_means = at_best_lr(by_exp)
  rows = table_rows(best, baseline)
  table = markdown_table(rows, about, params)
  several = len({lr for by_lr in lr_means.values() for lr in by_lr}) > 1
  lrs = lr_table(lr_means) if several else ''
  md, csv_path, runs_path, png = (
      os.fspath(out / f'{name}_{corpus}.{ext}') for name, ext in
      (('results', 'md'), ('results', 'csv'), ('runs', 'csv'), ('loss', 'png')))
  paths.as_path(md).write_text(
      table + '\n' + ('\nFinal validation loss per learning rate (mean over the seeds trained at '
                      f'every rate):\n\n{lrs}\n' if lrs else ''))
  write_csv(rows, csv_path)
  write_csv(seed_rows(corpus, by_exp), runs_path, SEED_FIELDS)
  plots.loss_curves(curves(best), png, f'{corpus}: loss per variant (mean over seeds, '
                    'band = min to max)')
  return {'rows': rows, 'table': table, 'lr_table': lrs, 'best': best,
          'files': [md, csv_path, runs_path, png]}


def _rel(path: str, start: str) -> str:
  """The link from a file in directory `start` to `path`: relative when both are on the same
  file system or in the same bucket, else `path` itself."""
  scheme, _, rest = os.fspath(path).rpartition('://')
  start_scheme, _, start_rest = os.fspath(start).rpartition('://')
  if scheme != start_scheme or (scheme and rest.split('/')[0] != start_rest.split('/')[0]):
    return os.fspath(path)
  if scheme:
    return posixpath.relpath(rest, start_rest)
  return os.path.relpath(path, start).replace(os.sep, '/')


def write_report(path: str, *, command: str, collected: dict[str, dict[str, list]],
                 corpus_results: dict[str, dict[str, Any]], analysis_files: dict[str, list[str]],
                 baseline: str, about: dict[str, str], params: dict[str, dict[str, int]],
                 analysis_tokens: dict[str, int], note: str = '', discussion: str = '') -> None:
  """Writes the markdown report (docs/results.md) from the sweep's collected results.

  Args:
    path: the report file; figures are linked relative to it.
    command: the command that produced it.
    collected: from `collect`.
    corpus_results: corpus -> write_corpus_results(...).
    analysis_files: corpus -> PNG paths of the analyses (overlays first).
    baseline, about, params: the baseline experiment, one-line descriptions, parameter counts.
    analysis_tokens: corpus -> number of validation tokens the analyses averaged over.
    note: a sentence appended to the setup's wall-time line (e.g. about a shared machine).
    discussion: markdown for a Discussion section after the setup ('' for none).

  An existing report's text from KEEP_MARKER on is kept at the end.
  """
  start = os.fspath(paths.as_path(path).parent)
  finished = [r for by_exp in collected.values() for runs in by_exp.values() for r in runs]
  if not finished:
    raise ValueError('no finished runs to report (run the sweep, or its printed commands, first)')
  any_run = finished[0]
  cfg = any_run['config']
  walls = [r['wall_s'] for by_exp in collected.values() for runs in by_exp.values()
           for r in runs if r['wall_s'] is not None]
  n_runs = sum(len(runs) for by_exp in collected.values() for runs in by_exp.values())
  m = cfg['model']
  rates = sorted({r['lr'] for r in finished})
  lr_text = (f'AdamW lr {rates[0]:g}' if len(rates) == 1 else
             f'AdamW, each variant at its best lr of {", ".join(f"{lr:g}" for lr in rates)} (the '
             'lowest final validation loss averaged over the seeds trained at every rate; chosen '
             'on the same validation tokens the tables report, so slightly optimistic for every '
             'variant alike)')
  lines = [
      '# Results', '',
      f'Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
      'UTC. Every number below was measured by that command; re-running it skips finished runs '
      'and regenerates this page.', '',
      '## Setup', '',
      *(f'- Trained on: {desc} ({n} of {n_runs} runs).'
        for desc, n in machines(collected).items()),
      f'- Model: decoder, d_model {m["d_model"]}, {m["num_layers"]} layers, {m["num_heads"]} '
      f'heads, MLP {m["mlp_dim"]}, vocab {m["vocab_size"]} '
      f'(parameter counts per variant in the tables).',
      f'- Training: {cfg["train"]["num_steps"]} steps x batch {cfg["train"]["batch_size"]} x '
      f'{cfg["data"]["seq_len"]} tokens = {any_run["tokens_seen"]:,} tokens seen per run; '
      f'{lr_text}, {cfg["optim"]["schedule"]} schedule, '
      f'{cfg["optim"]["warmup_steps"]} warmup steps.',
      f'- Evaluation: the final evaluation of each run on {int(any_run["eval_tokens"] or 0):,} '
      'validation tokens (the same tokens for every run of a corpus).',
      f'- {n_runs} runs, {sum(walls) / 3600:.2f} h of wall time in total '
      f'({np.mean(walls) if walls else math.nan:.0f} s per run on average).'
      + (f' {note}' if note else ''),
      '- Seeds: seed s sets the data order and the initialisation, the same for every variant: '
      'the same batches, and the same initial values of the weights the variants share '
      '(embedding, attention, MLP, output head). So the runs of one seed are paired. Table: mean '
      f'± sample std over seeds; paired Δ = mean over the paired seeds of (variant − `{baseline}`)'
      ', ± its paired standard error (std of the per-seed differences / sqrt(pairs)); the '
      'unpaired Δ (difference of means, ± the Welch standard error) beside it; "beyond 2 SE" '
      'marks a paired difference larger than twice its standard error. Per-seed final metrics: '
      'runs_<corpus>.csv beside the tables.', '',
  ]
  if discussion:
    lines += ['## Discussion', '', discussion, '']
  for corpus, result in corpus_results.items():
    loss_png = next(p for p in result['files'] if p.endswith('.png'))
    pairs = sorted({s for r in result['rows'] for s in r['paired_seeds'].split()}, key=int)
    lines += [f'## Corpus: {corpus}', '', result['table'], '',
              f'Paired seeds (each with `{baseline}`): {", ".join(pairs) or "none"}; the seeds '
              'column lists them per variant.', '']
    if result['lr_table']:
      lines += ['Final validation loss per learning rate (mean over the seeds trained at every '
                'rate; bold: the rate the table reports):', '', result['lr_table'], '']
    lines += [f'![loss curves]({_rel(loss_png, start)})', '']
    summary = [r for r in result['rows'] if r['variant'] != baseline]
    lower = [r['variant'] for r in summary if r['verdict'].startswith('lower')]
    higher = [r['variant'] for r in summary if r['verdict'].startswith('higher')]
    noise = [r['variant'] for r in summary if r['verdict'].startswith('within')]
    single = [r['variant'] for r in summary if r['verdict'].startswith('one paired')]
    lines += [f'Measured on {corpus}: lower eval loss than `{baseline}` beyond 2 SE: '
              f'{", ".join(lower) or "none"}; higher beyond 2 SE: {", ".join(higher) or "none"}; '
              f'within seed noise: {", ".join(noise) or "none"}'
              + (f'; one paired seed, spread unknown: {", ".join(single)}' if single else '')
              + '.', '']
    files = analysis_files.get(corpus, [])
    if files:
      lines += [f'### Analyses ({corpus}, seed 0 of each variant, '
                f'{analysis_tokens.get(corpus, 0):,} validation tokens)', '',
                'Representation collapse (HC Fig. 3: cosine similarity of adjacent sub-layers\' '
                'inputs) and the composite Amax gain of the residual mixing (mHC Fig. 7; 1 for '
                'a residual, near 1 expected for mHC):', '']
      lines += [f'![{os.path.basename(p)}]({_rel(p, start)})' for p in files
                if os.path.basename(p).startswith('compare_')]
      lines += ['', 'Per variant: unrolled connection matrices (HC App. F), coefficient '
                'distributions per layer, collapse and gain:', '']
      by_variant = {}
      for p in files:
        if not os.path.basename(p).startswith('compare_'):
          parts = p.split(os.sep)  # .../analysis/<variant>[/lr<lr>]/<plot>.png
          variant = parts[len(parts) - 1 - parts[::-1].index('analysis') + 1]
          by_variant.setdefault(variant, []).append(p)
      lines += [f'- {variant}: ' + ' · '.join(
          f'[{os.path.basename(p).rsplit("_", 1)[0]}]({_rel(p, start)})' for p in pngs)
                for variant, pngs in by_variant.items()]
      lines.append('')
  paths.as_path(path).write_text('\n'.join(lines) + _kept_tail(path))


# Sections of a report below this line are written by other commands (docs/results.md's Depth
# section: sweep.py --suite=depth): regenerating the report keeps them as they are.
KEEP_MARKER = '<!-- Not regenerated by the report command: the sections below are kept. -->'


def _kept_tail(path: str) -> str:
  """The existing report's text from KEEP_MARKER on ('' if it has none)."""
  report = paths.as_path(path)
  text = report.read_text() if report.exists() else ''
  return '\n' + text[text.index(KEEP_MARKER):] if KEEP_MARKER in text else ''
