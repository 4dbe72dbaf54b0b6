"""The paper-scale step on TPU slices, compiled ahead of time (hyperconn_jax.aot): what fits.

For each experiment of configs/paper.py at size=paper and the TPU slice --topology, tries the
(gradient accumulation, remat policy) candidates in order (least accumulation first, then each
remat policy in --remat order) and keeps the first whose compiled step fits in the chip's HBM.
Reports the mesh, per-chip microbatch, accumulation, remat, memory per chip and the roofline step
time, with each variant's step-time ratio to the residual Pre-Norm on the same slice.

  python benchmarks/scaling.py --topology=v5p:4x4x4 --accum=2,4,8 --out=runs/scaling/v5p.json
  python benchmarks/scaling.py --merge runs/scaling/v5p.json runs/scaling/v5e.json \
      --markdown=runs/scaling/table.md

Needs libtpu (pip install 'jax[tpu]==0.10.2'); no TPU. See docs/scaling.md.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Compile only: never run anything on a local TPU.

import bench  # pylint: disable=g-import-not-at-top
from configs import paper
from hyperconn_jax import aot


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def fit(experiment: str, topology: str, accums: list[int], remats: list[str], seq_len: int,
        global_batch: int, roofline: bool) -> dict:
  """The first candidate that fits (aot.analyze's figures), or a row saying none did."""
  _, num_chips = aot.parse_topology(topology)
  tried = []
  for accum in accums:
    if global_batch % accum or (global_batch // accum) % num_chips:
      tried.append(f'accum {accum}: the microbatch does not divide over {num_chips} chips')
      continue
    for remat in remats:
      config = paper.get_config(f'experiment={experiment},size=paper')
      config.data.seq_len = seq_len
      config.train.batch_size = global_batch
      config.optim.grad_accum_steps = accum
      config.model.remat_policy = remat
      print(f'{experiment} on {topology}: accum {accum}, remat {remat} ...', flush=True)
      try:
        result = aot.analyze(config, topology, roofline=roofline)
      except aot.OutOfMemoryError as e:
        tried.append(f'accum {accum}, remat {remat}: {e}')
        print(f'  does not fit: {e}', flush=True)
        continue
      print(aot.report(result), flush=True)
      if result['fits']:
        return dict(result, experiment=experiment, tried=tried)
      tried.append(f"accum {accum}, remat {remat}: {result['peak_bytes'] / 2**30:.1f} GiB")
  return {'experiment': experiment, 'topology': topology, 'fits': False, 'tried': tried}


def markdown(rows: list[dict]) -> str:
  """One table row per (topology, experiment), the residual Pre-Norm first; ratios are to it."""
  topologies = list(dict.fromkeys(r['topology'] for r in rows))
  rows = sorted(rows, key=lambda r: (topologies.index(r['topology']),
                                     r.get('connection') != 'residual_prenorm'))
  baseline = {r['topology']: r.get('roofline_step_s') for r in rows
              if r.get('connection') == 'residual_prenorm'}
  lines = ['| slice | model | mesh | per-chip microbatch x accumulation | remat | memory per chip '
           '(of HBM) | roofline step | x residual | model FLOPs per step |',
           '|:---|:---|:---|:---:|:---|---:|---:|---:|---:|']
  for r in rows:
    if not r['fits']:
      lines.append(f"| {r['topology']} | {r['experiment']} | - | no candidate fits | | | | | |")
      continue
    step_s, base = r.get('roofline_step_s'), baseline.get(r['topology'])
    timing = f'{step_s:.2f} s | ' if step_s else 'not computed | '
    timing += f'{step_s / base:.3f}' if step_s and base else '-'
    mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items() if v > 1) or 'one chip'
    lines.append(
        f"| {r['topology']} ({r['num_chips']} chips) | {r['experiment']} | {mesh} | "
        f"{r['per_chip_microbatch']:g} x {r['grad_accum_steps']} | {r['remat_policy']} | "
        f"{r['peak_bytes'] / 2**30:.1f} GiB ({r['hbm_fraction']:.0%}) | {timing} | "
        f"{r['model_flops_per_step']:.3g} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--topology', default='v5p:4x4x4')
  p.add_argument('--experiments', default='prenorm,dhc4,mhc4',
                 help='configs/paper.py experiments (prenorm: the baseline of the ratios)')
  p.add_argument('--accum', type=_ints, default=[1, 2, 4, 8],
                 help='gradient accumulation steps to try, in order')
  p.add_argument('--remat', default='dots_no_batch,full', help='remat policies to try, in order')
  p.add_argument('--seq_len', type=int, default=2048)
  p.add_argument('--global_batch', type=int, default=2048, help='sequences per step (HC: 2048)')
  p.add_argument('--memory_only', action='store_true',
                 help='skip the roofline (its two extra compiles): memory and model FLOPs only')
  p.add_argument('--merge', nargs='*', default=None,
                 help='only merge these JSON files (written by --out) into one table')
  p.add_argument('--out', default='', help='JSON output path')
  p.add_argument('--markdown', default='', help='markdown output path')
  args = p.parse_args(argv)
  if args.merge is not None:
    rows = []
    for path in args.merge:
      with open(path) as f:
        rows += json.load(f)['rows']
    result = None
  else:
    rows = [fit(e, args.topology, args.accum, args.remat.split(','), args.seq_len,
                args.global_batch, not args.memory_only) for e in args.experiments.split(',')]
    result = {'command': ' '.join(sys.argv), 'args': vars(args),
              'time_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()), 'rows': rows}
  table = markdown(rows)
  print(table)
  bench.write_outputs(args.out if result is not None else '', result, args.markdown, table)


if __name__ == '__main__':
  main()
