"""Runs the analyses on a model or a checkpoint and writes their JSON and PNG files."""

import json
import os
from typing import Any, Iterable

import numpy as np

from hyperconn_jax import checkpoint, paths

from hyperconn_jax.analysis import diagnostics, loading, plots, trace

ANALYSES = ('connections', 'collapse', 'gain', 'coefficients')
# Analyses that can be overlaid across checkpoints (one figure, one line per checkpoint).
OVERLAYS = ('collapse', 'gain')

_COMPUTE = {
    'connections': diagnostics.connection_matrices,
    'collapse': diagnostics.collapse,
    'gain': diagnostics.gain,
    'coefficients': diagnostics.coefficient_stats,
}


def check_analyses(names: Iterable[str]) -> tuple[str, ...]:
  """Returns the names as a tuple; ValueError naming the bad one and the allowed ones."""
  names = tuple(names)
  for name in names:
    if name not in ANALYSES:
      raise ValueError(f'analysis {name!r} is unknown; allowed: {", ".join(ANALYSES)}')
  return names


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def trace_tokens(model, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Traces a loop-layout model on validation batches ({'inputs', 'weights'}: tokens and weights
  [B, L] of a language model, images and weights [B] of a classifier); per-token arrays
  (diagnostics.select_tokens) of all of them together."""
  if not batches:
    raise ValueError('no validation batches to analyse')
  return diagnostics.concat_tokens([
      diagnostics.select_tokens(trace.trace(model, b['inputs']), b.get('weights'))
      for b in batches])


def analyze_model(model, batches: list[dict[str, np.ndarray]],
                  analyses: Iterable[str] = ANALYSES) -> dict[str, Any]:
  """{analysis name: result} for a loop-layout model on validation batches (see diagnostics)."""
  analyses = check_analyses(analyses)
  tokens = trace_tokens(model, batches)
  results = {name: _COMPUTE[name](tokens) for name in analyses}
  results['num_tokens'] = int(tokens['res'].shape[0])
  return results


def write(results: dict[str, Any], out_dir: str, tag: str, title: str,
          source: str | None = None) -> list[str]:
  """Writes <analysis>_<tag>.json and .png for each analysis in `results`; returns the paths.
  `source` (checkpoint.fingerprint of the analysed checkpoint) goes into each JSON, for
  read_written."""
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  draw = {
      'connections': lambda r, p: plots.connection_matrices(r, p, f'{title}: unrolled '
                                                            'connection matrices (HC App. F)'),
      'collapse': lambda r, p: plots.collapse({title: r}, p, 'Adjacent-layer input cosine '
                                              'similarity (median, 5-95%)'),
      'gain': lambda r, p: plots.gain({title: r}, p, f'{title}: Amax gain of the residual mixing'),
      'coefficients': lambda r, p: plots.coefficients(r, p, f'{title}: connection coefficients '
                                                      '(median, 5-95% over tokens)'),
  }
  written = []
  for name in ANALYSES:
    if name not in results:
      continue
    base = os.fspath(out / f'{name}_{tag}')
    paths.as_path(base + '.json').write_text(json.dumps(
        {'analysis': name, 'label': title, 'num_tokens': results['num_tokens'],
         'source': source, 'result': _jsonable(results[name])}))
    draw[name](results[name], base + '.png')
    written += [base + '.json', base + '.png']
  return written


def _arrays(value: Any) -> Any:
  """Inverse of _jsonable: numeric (nested) lists back to arrays."""
  if isinstance(value, dict):
    return {k: _arrays(v) for k, v in value.items()}
  if isinstance(value, list):
    try:
      array = np.asarray(value)
    except ValueError:  # Ragged.
      array = None
    if array is not None and array.dtype.kind in 'biuf':
      return array
    return [_arrays(v) for v in value]
  return value


def read_written(out_dir: str, tag: str, analyses: Iterable[str] = ANALYSES, *,
                 source: str | None = None) -> dict[str, Any] | None:
  """The results that `write` left in out_dir for `tag` (so a rerun need not restore and trace the
  checkpoint again), shaped like analyze_checkpoint's; None unless every analysis and its PNG is
  there and, if `source` (checkpoint.fingerprint of the checkpoint to analyse) is given, was
  written from that checkpoint (not from an earlier run's checkpoint of the same step)."""
  results, files = {}, []
  for name in check_analyses(analyses):
    base = os.fspath(paths.as_path(out_dir) / f'{name}_{tag}')
    if not (paths.as_path(base + '.json').exists() and paths.as_path(base + '.png').exists()):
      return None
    written = json.loads(paths.as_path(base + '.json').read_text())
    if source is not None and written.get('source') != source:
      return None
    results[name] = _arrays(written['result'])
    results['num_tokens'] = written['num_tokens']
    files += [base + '.json', base + '.png']
  results['files'] = files
  results['step'] = int(tag) if tag.isdigit() else tag
  return results


def analyze_checkpoint(workdir: str, step: str | int = 'latest', *, defaults,
                       analyses: Iterable[str] = ANALYSES, num_batches: int = 2,
                       out_dir: str | None = None, data_dir: str | None = None,
                       label: str | None = None) -> dict[str, Any]:
  """Restores `step` of the run in `workdir`, analyses it on validation text and writes
  <analysis>_<step>.json / .png into out_dir (default WORKDIR/analysis). `defaults`: every config
  field's default (configs/base.py's get_config(); see rundir.load_run_config).

  Returns:
    {analysis: result, 'num_tokens', 'step', 'files': the written paths}.
  """
  analyses = check_analyses(analyses)
  config, model, checkpoint_step = loading.load_model(workdir, step, defaults=defaults,
                                                         data_dir=data_dir)
  batches = loading.validation_batches(config, num_batches)
  results = analyze_model(model, batches, analyses)
  label = label or os.path.basename(os.path.normpath(workdir))
  out_dir = out_dir or os.fspath(paths.as_path(workdir) / 'analysis')
  results['files'] = write(results, out_dir, str(checkpoint_step),
                           f'{label} step {checkpoint_step}',
                           source=checkpoint.fingerprint(workdir, checkpoint_step))
  results['step'] = checkpoint_step
  return results


def compare(results_by_label: dict[str, dict[str, Any]], out_dir: str) -> list[str]:
  """Overlays the collapse and gain results of several checkpoints (HC Fig. 3, mHC Fig. 7);
  writes compare_<analysis>.png and .json into out_dir; returns the paths."""
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name in OVERLAYS:
    subset = {label: r[name] for label, r in results_by_label.items() if name in r}
    if not subset:
      continue
    base = os.fspath(out / f'compare_{name}')
    paths.as_path(base + '.json').write_text(json.dumps(_jsonable(subset)))
    if name == 'collapse':
      plots.collapse(subset, base + '.png', 'Adjacent-layer input cosine similarity '
                     '(median, 5-95% band)')
    else:
      plots.gain(subset, base + '.png', 'Composite Amax gain of the residual mixing')
    written += [base + '.json', base + '.png']
  return written
