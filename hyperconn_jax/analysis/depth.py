"""The depth study (configs/paper.py suite `depth`; docs/results.md, Depth): HC section 1's seesaw
measured against the number of blocks.

Rows are (variant, depth): an experiment's depth is its config's model.num_layers and its variant
the experiment's name without the `_L<depth>` suffix. Per row:
  loss       final validation loss over seeds, and the paired difference to the baseline variant at
             the same depth (results.summarize: mean of the per-seed differences, paired SE)
  collapse   HC Fig. 3: cosine similarity of adjacent sub-layers' inputs (median over tokens) at
             the end of training, averaged over all sub-layer pairs and over the second half
  gradients  the gradient norm of each sub-layer's branch weights (analysis/gradients.py) at
             initialisation and at the kept checkpoints; summarised as the ratio of the first
             block's to the last block's norm (< 1: the early layers' gradients vanish, Post-Norm's
             side of the seesaw) and the smallest and largest sub-layer norm
  gain       mHC's measure: the largest composite Amax gain (forward and backward) over the
             sub-layers, at the end of training
The collapse, gain and gradient analyses use seed 0 of each row (at its best learning rate).

  measure(best, analysis_dirs)  runs (or reads back) the analyses of every experiment
  table_rows(best, measured)    the rows;   write(rows, measured, out_dir)  tables and plots
"""

import json
import math
import os
from typing import Any

import numpy as np

from hyperconn_jax import checkpoint, paths
from hyperconn_jax.analysis import gradients, plots, results, runner

GRADIENTS_FILE = 'gradients.json'
# The runner analyses the study reads (the connection matrices and coefficients of a deep model are
# large and not needed here).
ANALYSES = ('collapse', 'gain')
FIELDS = ('variant', 'depth', 'lr', 'seeds', 'paired_seeds', 'eval_loss_mean', 'eval_loss_std',
          'diff', 'diff_se', 'verdict', 'cos_mean', 'cos_second_half', 'grad_ratio_init',
          'grad_ratio_final', 'grad_min_final', 'grad_max_final', 'gain_forward_max',
          'gain_backward_max')


def variant_and_depth(experiment: str, config: dict[str, Any]) -> tuple[str, int]:
  """(variant, depth) of an experiment from its name and its run's config (a dict)."""
  depth = int(config['model']['num_layers'])
  return experiment.removesuffix(f'_L{depth}'), depth


def measure(best: dict[str, list[dict[str, Any]]], analysis_dirs: dict[str, str], *, defaults,
            num_batches: int = 4, log=print) -> dict[str, dict[str, Any]]:
  """The analyses of seed 0 (the first run) of each experiment: collapse and gain at its last
  step, gradient norms at initialisation and at every kept checkpoint.

  Results are written into (and, when there and written from the same final checkpoint, read
  back from) analysis_dirs[experiment], in the files runner.analyze_checkpoint writes (ANALYSES)
  and GRADIENTS_FILE.

  Args:
    best: {experiment: its runs at its best learning rate} (results.at_best_lr).
    analysis_dirs: {experiment: directory}.
    defaults: every config field's default (configs/base.py's get_config()).
    num_batches: validation batches per analysis.

  Returns:
    {experiment: {'collapse', 'gain', 'gradients': {step: gradients.gradient_norms result}}}.
  """
  out = {}
  for exp, runs in best.items():
    if not runs:
      continue
    run, exp_dir = runs[0]['run'], analysis_dirs[exp]
    step = runs[0]['config']['train']['num_steps']
    log(f'depth analyses: {exp} ({run.workdir})')
    # What was written from another checkpoint of this step (an earlier run) is not reused.
    source = checkpoint.fingerprint(run.workdir, step)
    r = runner.read_written(exp_dir, str(step), ANALYSES, source=source) or (
        runner.analyze_checkpoint(run.workdir, step, defaults=defaults, analyses=ANALYSES,
                                  num_batches=num_batches, out_dir=exp_dir, label=exp))
    grad_path = paths.as_path(exp_dir) / GRADIENTS_FILE
    written = json.loads(grad_path.read_text()) if grad_path.exists() else {}
    if 'norms' in written and source in (None, written.get('source')):
      grads = {int(s): g for s, g in written['norms'].items()}
    else:
      grads = gradients.checkpoint_gradient_norms(run.workdir, defaults=defaults,
                                                  num_batches=num_batches)
      grad_path.write_text(json.dumps({'source': source,
                                       'norms': {str(s): g for s, g in grads.items()}}))
    out[exp] = {'collapse': r['collapse'], 'gain': r['gain'], 'gradients': grads}
  return out


def _block_ratio(branch: list[float]) -> float:
  """Mean norm of the first block's two sub-layers over the last block's."""
  b = np.asarray(branch, np.float64)
  last = np.mean(b[-2:])
  return float(np.mean(b[:2]) / last) if last > 0 else math.nan


def table_rows(best: dict[str, list[dict[str, Any]]], measured: dict[str, dict[str, Any]], *,
               baseline: str = 'prenorm') -> list[dict[str, Any]]:
  """One row (FIELDS) per (variant, depth), sorted by depth then in `best`'s order; the paired
  difference is to `baseline` at the same depth."""
  by_depth: dict[int, dict[str, str]] = {}
  for exp, runs in best.items():
    if runs:
      variant, depth = variant_and_depth(exp, runs[0]['config'])
      by_depth.setdefault(depth, {})[variant] = exp
  rows = []
  for depth in sorted(by_depth):
    exps = by_depth[depth]
    losses = {v: {r['seed']: r['final']['eval_loss'] for r in best[e]} for v, e in exps.items()}
    for stats in results.summarize(losses, baseline):
      exp = exps[stats['variant']]
      row = {'variant': stats['variant'], 'depth': depth, 'lr': best[exp][0]['lr'],
             'seeds': stats['n'], 'paired_seeds': ' '.join(map(str, stats['pairs'])),
             'eval_loss_mean': stats['mean'], 'eval_loss_std': stats['std'],
             'diff': stats['diff'], 'diff_se': stats['diff_se'],
             'verdict': results.verdict(stats, baseline)}
      row.update({k: math.nan for k in FIELDS[10:]})
      m = measured.get(exp)
      if m:
        cos = np.asarray(m['collapse']['median'], np.float64)
        grads = m['gradients']
        final = grads[max(grads)]['branch']
        row.update({
            'cos_mean': float(np.mean(cos)), 'cos_second_half': float(np.mean(cos[len(cos) // 2:])),
            'grad_ratio_init': _block_ratio(grads[0]['branch']),
            'grad_ratio_final': _block_ratio(final),
            'grad_min_final': float(np.min(final)), 'grad_max_final': float(np.max(final)),
            'gain_forward_max': float(np.max(m['gain']['composite_forward'])),
            'gain_backward_max': float(np.max(m['gain']['composite_backward']))})
      rows.append(row)
  return rows


def _f(value: float, digits: int = 3) -> str:
  return 'n/a' if value is None or math.isnan(value) else f'{value:.{digits}f}'


def markdown_table(rows: list[dict[str, Any]], baseline: str = 'prenorm') -> str:
  """The rows as a markdown table."""
  lines = [f'| blocks | variant | lr | seeds | eval loss | Δ vs {baseline}, paired | verdict | '
           'cos adj. (all / 2nd half) | grad first/last block (init → final) | '
           'grad min–max (final) | composite gain fwd / bwd |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    base = r['verdict'] == 'baseline'
    loss = (_f(r['eval_loss_mean'], 4) + ('' if r['seeds'] < 2 else
                                          f' ± {_f(r["eval_loss_std"], 4)}'))
    diff = '—' if base else ('n/a' if math.isnan(r['diff']) else f'{r["diff"]:+.4f}' + (
        '' if math.isnan(r['diff_se']) else f' ± {r["diff_se"]:.4f}'))
    lines.append(
        f'| {r["depth"]} | {r["variant"]} | {r["lr"]:g} | {r["seeds"]} | {loss} | {diff} | '
        f'{r["verdict"]} | {_f(r["cos_mean"])} / {_f(r["cos_second_half"])} | '
        f'{_f(r["grad_ratio_init"], 2)} → {_f(r["grad_ratio_final"], 2)} | '
        f'{_f(r["grad_min_final"], 4)}–{_f(r["grad_max_final"], 4)} | '
        f'{_f(r["gain_forward_max"], 2)} / {_f(r["gain_backward_max"], 2)} |')
  return '\n'.join(lines)


def write(rows: list[dict[str, Any]], measured: dict[str, dict[str, Any]],
          best: dict[str, list[dict[str, Any]]], out_dir: str, baseline: str = 'prenorm'
          ) -> list[str]:
  """Writes into out_dir (any etils.epath path): depth.md (the table), depth.csv (its rows),
  depth_runs.csv (every run's final loss) and four plots against depth (plots.depth_*):
  depth_loss.png, depth_collapse.png, depth_gradients.png, depth_gain.png. Returns the paths."""
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = [os.fspath(out / name) for name in (
      'depth.md', 'depth.csv', 'depth_runs.csv', 'depth_loss.png', 'depth_collapse.png',
      'depth_gradients.png', 'depth_gain.png')]
  paths.as_path(files[0]).write_text(markdown_table(rows, baseline) + '\n')
  results.write_csv(rows, files[1], FIELDS)
  results.write_csv([{'variant': variant_and_depth(e, r['config'])[0],
                      'depth': variant_and_depth(e, r['config'])[1], 'lr': r['lr'],
                      'seed': r['seed'], 'eval_loss': r['final']['eval_loss']}
                     for e, runs in best.items() for r in runs], files[2],
                    ('variant', 'depth', 'lr', 'seed', 'eval_loss'))
  profiles = {}  # variant -> {depth: measured}
  for exp, m in measured.items():
    variant, depth = variant_and_depth(exp, best[exp][0]['config'])
    profiles.setdefault(variant, {})[depth] = m
  plots.depth_loss(rows, files[3])
  plots.depth_collapse(rows, profiles, files[4])
  plots.depth_gradients(rows, profiles, files[5])
  plots.depth_gain(rows, files[6])
  return files
