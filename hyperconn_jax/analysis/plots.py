"""PNG figures of the analyses (matplotlib, Agg backend: no display needed)."""

import io
import math

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
from matplotlib import ticker  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
from PIL import Image  # noqa: E402  pylint: disable=g-import-not-at-top

from hyperconn_jax import paths  # noqa: E402  pylint: disable=g-import-not-at-top

_DPI = 110


def _save(fig, path: str) -> None:
  """Writes the figure as a 256-colour PNG: line plots and heatmaps stay legible at about a third
  of the size of a full-colour one (reports commit these files)."""
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=_DPI, format='png')
  plt.close(fig)
  png = io.BytesIO()
  Image.open(buffer).convert('RGB').quantize(256).save(png, format='png', optimize=True)
  paths.as_path(path).write_bytes(png.getvalue())  # A local path or a URL (gs://...).


def _integer_x(ax) -> None:
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def _heatmap(ax, matrix: np.ndarray, title: str, vmax: float, annotate: bool) -> None:
  size = matrix.shape[0]
  masked = np.ma.masked_where(np.triu(np.ones_like(matrix, bool), k=1), matrix)
  image = ax.imshow(masked, cmap='RdBu_r', vmin=-vmax, vmax=vmax)
  ax.set_title(title)
  ax.set_xlabel('output of layer j (0 = embedding)')
  ax.set_ylabel(f'input of layer k ({size} = output)')
  ticks = range(size)
  ax.set_xticks(list(ticks), [str(j) for j in ticks], fontsize=7)
  ax.set_yticks(list(ticks), [str(k + 1) for k in ticks], fontsize=7)
  if annotate:
    for k in range(size):
      for j in range(k + 1):
        dark = abs(matrix[k, j]) > 0.6 * vmax
        ax.text(j, k, f'{matrix[k, j]:.2f}', ha='center', va='center', fontsize=6,
                color='white' if dark else 'black')
  plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def connection_matrices(result: dict, path: str, title: str) -> None:
  """Heatmaps of C^(0) and every C^(i) (lower triangle; diverging colours centred on 0)."""
  c0 = np.asarray(result['C0'])
  cs = np.asarray(result['C_streams'])
  panels = [('C(0): layer inputs', c0)] + [(f'C({i + 1}): stream {i}', c) for i, c in
                                             enumerate(cs)]
  cols = min(len(panels), 3)
  rows = math.ceil(len(panels) / cols)
  size = c0.shape[0]
  cell = min(max(3.2, 0.32 * size), 8.0)  # Deep models: a 65 x 65 heatmap needs no more.
  fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.5, rows * cell), squeeze=False)
  vmax = max(float(np.max(np.abs(np.tril(c0)))), float(np.max(np.abs(np.tril(cs)))), 1e-6)
  for ax, (name, matrix) in zip(axes.flat, panels):
    _heatmap(ax, matrix, name, vmax, annotate=size <= 12)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle(title)
  _save(fig, path)


def collapse(results: dict[str, dict], path: str, title: str) -> None:
  """Median and 5-95% band of adjacent-layer cosine similarity, one line per label."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, r in results.items():
    line, = ax.plot(r['layer'], r['median'], marker='o', ms=3, label=label)
    ax.fill_between(r['layer'], r['p05'], r['p95'], color=line.get_color(), alpha=0.15)
  ax.set_xlabel('sub-layer k (cosine of the inputs of k - 1 and k)')
  _integer_x(ax)
  ax.set_ylabel('cosine similarity')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def gain(results: dict[str, dict], path: str, title: str) -> None:
  """Composite (and, for one label, single-layer) Amax gain per sub-layer, log scale."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, r in results.items():
    for ax, direction in zip(axes, ('forward', 'backward')):
      line, = ax.plot(r['layer'], r[f'composite_{direction}'], marker='o', ms=3,
                      label=f'{label} composite')
      if len(results) == 1:
        ax.plot(r['layer'], r[direction], ls='--', color=line.get_color(),
                label=f'{label} single layer')
  for ax, direction in zip(axes, ('forward (max |row sum|)', 'backward (max |column sum|)')):
    values = np.concatenate([l.get_ydata() for l in ax.get_lines()])
    if np.min(values) > 0 and np.max(values) / np.min(values) > 10:  # Linear when close to 1.
      ax.set_yscale('log')
    _integer_x(ax)
    ax.set_xlabel('sub-layer l (composite of 1..l)')
    ax.set_ylabel('Amax gain magnitude')
    ax.set_title(direction)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  fig.suptitle(title)
  _save(fig, path)


def _groups(name: str, shape: list[int]) -> list[tuple[str, list[tuple[int, ...]]]]:
  """Entries of a coefficient, grouped into panels: alpha [N, M] -> its branch-input columns,
  A_r diagonal and off-diagonal; H_res -> diagonal / off-diagonal; vectors -> one panel."""
  shape = [int(s) for s in shape]  # Plain ints label the legend (also from a reloaded array).
  if len(shape) <= 1:
    return [(name, [(i,) for i in range(shape[0])] if shape else [()])]
  rows, cols = shape
  if name == 'alpha':
    reads = cols - rows  # hc: 1 column (A_m), frac: m columns (Y).
    return [('alpha: branch input (A_m / Y)', [(i, j) for i in range(rows) for j in range(reads)]),
            ('alpha: residual diagonal', [(i, reads + i) for i in range(rows)]),
            ('alpha: residual off-diagonal', [(i, reads + j) for i in range(rows)
                                             for j in range(rows) if i != j])]
  return [(f'{name} diagonal', [(i, i) for i in range(rows)]),
          (f'{name} off-diagonal', [(i, j) for i in range(rows) for j in range(cols) if i != j])]


def coefficients(stats: list[dict], path: str, title: str) -> None:
  """Per sub-layer, the median and 5-95% band of each coefficient entry, one panel per group."""
  if not stats or not stats[0]:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.text(0.5, 0.5, 'no learned coefficients (residual)', ha='center', va='center')
    ax.axis('off')
    _save(fig, path)
    return
  # (name, panel title, entries); no panel for an empty group (x1 has no off-diagonal).
  panels = [(name,) + g for name, s in stats[0].items() for g in _groups(name, s['shape'])
            if g[1]]
  cols = min(len(panels), 3)
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.5, rows * 3.2), squeeze=False)
  layers = np.arange(1, len(stats) + 1)
  for ax, (name, panel, entries) in zip(axes.flat, panels):
    for entry in entries:
      pick = lambda key, e=entry: [np.asarray(s[name][key])[e] for s in stats]  # noqa: E731
      line, = ax.plot(layers, pick('p50'), lw=1, label=str(entry) if len(entries) <= 8 else None)
      ax.fill_between(layers, pick('p05'), pick('p95'), color=line.get_color(), alpha=0.12)
    ax.set_title(panel, fontsize=9)
    ax.set_xlabel('sub-layer')
    _integer_x(ax)
    ax.grid(alpha=0.3)
    if len(entries) <= 8:
      ax.legend(fontsize=6, ncol=2)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle(title, fontsize=9 if cols == 1 else None)  # One panel is narrow.
  _save(fig, path)


def loss_curves(curves: dict[str, dict], path: str, title: str) -> None:
  """Training and validation loss per variant: the mean over seeds, a band from min to max.

  Args:
    curves: label -> {'train': (steps, [seeds, steps] losses), 'eval': (steps, [seeds, steps])}.
  """
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for label, c in curves.items():
    for ax, key in zip(axes, ('train', 'eval')):
      steps, values = c[key]
      if not len(steps):
        continue
      values = np.asarray(values)
      line, = ax.plot(steps, values.mean(axis=0), lw=1.2, label=label)
      if values.shape[0] > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(),
                        alpha=0.15)
  for ax, name in zip(axes, ('training loss', 'validation loss')):
    ax.set_xlabel('step')
    ax.set_ylabel(f'{name} (nats / token)')
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  # The start of training dwarfs the differences: show the second half of the range.
  for ax in axes:
    lines = [l.get_ydata() for l in ax.get_lines()]
    if lines:
      lo = min(float(np.min(y)) for y in lines)
      hi = max(float(np.median(y)) for y in lines)
      if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
  fig.suptitle(title)
  _save(fig, path)


# ----------------------------------------------------------------------------- depth (depth.py)


def _by_variant(rows: list[dict]) -> dict[str, list[dict]]:
  """Rows grouped by variant (in first-seen order), each group sorted by depth."""
  out = {}
  for r in rows:
    out.setdefault(r['variant'], []).append(r)
  return {v: sorted(rs, key=lambda r: r['depth']) for v, rs in out.items()}


def _depth_axis(ax, rows: list[dict], ylabel: str, title: str) -> None:
  depths = sorted({r['depth'] for r in rows})
  ax.set_xscale('log', base=2)
  ax.set_xticks(depths, [str(d) for d in depths])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel('blocks (2 sub-layers each)')
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which='both')


def _log_if_spread(ax) -> None:
  values = np.concatenate([l.get_ydata() for l in ax.get_lines()] or [np.ones(1)])
  values = values[np.isfinite(values)]
  if len(values) and np.min(values) > 0 and np.max(values) / np.min(values) > 10:
    ax.set_yscale('log')


def _deepest(profiles: dict[str, dict[int, dict]]) -> int:
  """The largest depth any variant has analyses of (0 for none)."""
  return max((max(p) for p in profiles.values() if p), default=0)


def _solid_and_dashed(ax, rs: list[dict], solid: str, dashed: str, variant: str) -> str:
  """One variant's rows against depth: field `solid` as a solid line, `dashed` dashed in the same
  colour; returns that colour (for the variant's lines in the other panel)."""
  d = [r['depth'] for r in rs]
  line, = ax.plot(d, [r[solid] for r in rs], marker='o', ms=3, label=variant)
  ax.plot(d, [r[dashed] for r in rs], ls='--', marker='x', ms=3, color=line.get_color())
  return line.get_color()


def depth_loss(rows: list[dict], path: str) -> None:
  """Final validation loss (mean, bars: std over seeds) and the paired difference to the
  baseline (bars: 2 paired SE) against depth, one line per variant."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for variant, rs in _by_variant(rows).items():
    d = [r['depth'] for r in rs]
    bars = axes[0].errorbar(d, [r['eval_loss_mean'] for r in rs],
                            yerr=[r['eval_loss_std'] for r in rs], marker='o', ms=3, capsize=2,
                            label=variant)
    color = bars[0].get_color()  # The same colour per variant in both panels.
    if all(r['verdict'] == 'baseline' for r in rs):
      axes[1].axhline(0, color=color, lw=0.8, label=variant)
    else:
      se = [0 if math.isnan(r['diff_se']) else 2 * r['diff_se'] for r in rs]
      axes[1].errorbar(d, [r['diff'] for r in rs], yerr=se, marker='o', ms=3, capsize=2,
                       color=color, label=variant)
  _depth_axis(axes[0], rows, 'validation loss (nats / token)', 'final validation loss')
  _depth_axis(axes[1], rows, 'Δ loss (nats / token)', 'paired Δ to the baseline (± 2 SE)')
  axes[0].legend(fontsize=7)
  _save(fig, path)


def depth_collapse(rows: list[dict], profiles: dict[str, dict[int, dict]], path: str) -> None:
  """Adjacent-layer cosine similarity (HC Fig. 3): its mean over sub-layer pairs against depth
  (dashed: the second half's), and the per-sub-layer profile of the deepest models."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  deepest = _deepest(profiles)
  for variant, rs in _by_variant(rows).items():
    color = _solid_and_dashed(axes[0], rs, 'cos_mean', 'cos_second_half', variant)
    if deepest in profiles.get(variant, {}):
      c = profiles[variant][deepest]['collapse']
      axes[1].plot(c['layer'], c['median'], lw=1, color=color, label=variant)
  _depth_axis(axes[0], rows, 'cosine similarity', 'mean over sub-layer pairs (dashed: 2nd half)')
  axes[1].set_xlabel('sub-layer k (cosine of the inputs of k - 1 and k)')
  axes[1].set_ylabel('cosine similarity (median over tokens)')
  axes[1].set_title(f'profile at {deepest} blocks', fontsize=10)
  axes[1].grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  _save(fig, path)


def depth_gradients(rows: list[dict], profiles: dict[str, dict[int, dict]], path: str) -> None:
  """Branch gradient norms: the first block's over the last block's against depth (dashed: at
  initialisation, solid: at the end), and the per-sub-layer norms of the deepest models."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  deepest = _deepest(profiles)
  for variant, rs in _by_variant(rows).items():
    color = _solid_and_dashed(axes[0], rs, 'grad_ratio_final', 'grad_ratio_init', variant)
    if deepest in profiles.get(variant, {}):
      g = profiles[variant][deepest]['gradients']
      layers = range(1, len(g[0]['branch']) + 1)
      axes[1].plot(layers, g[max(g)]['branch'], lw=1, color=color, label=variant)
      axes[1].plot(layers, g[0]['branch'], lw=0.8, ls='--', color=color)
  _depth_axis(axes[0], rows, 'first block / last block', 'gradient-norm ratio (dashed: init)')
  axes[0].axhline(1, color='k', lw=0.6)
  _log_if_spread(axes[0])
  axes[1].set_xlabel('sub-layer k')
  axes[1].set_ylabel('‖∂loss/∂branch weights‖')
  axes[1].set_title(f'per sub-layer at {deepest} blocks (dashed: init)', fontsize=10)
  axes[1].set_yscale('log')
  axes[1].grid(alpha=0.3, which='both')
  axes[0].legend(fontsize=7)
  _save(fig, path)


def depth_gain(rows: list[dict], path: str) -> None:
  """The largest composite Amax gain over the sub-layers (mHC) against depth: forward (solid) and
  backward (dashed)."""
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for variant, rs in _by_variant(rows).items():
    d = [r['depth'] for r in rs]
    line, = ax.plot(d, [r['gain_forward_max'] for r in rs], marker='o', ms=3, label=variant)
    ax.plot(d, [r['gain_backward_max'] for r in rs], ls='--', marker='x', ms=3,
            color=line.get_color())
  _depth_axis(ax, rows, 'max composite Amax gain', 'composite gain (dashed: backward)')
  _log_if_spread(ax)
  ax.legend(fontsize=7)
  _save(fig, path)
