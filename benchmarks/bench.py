"""Train-step benchmark of every connection variant against the residual Pre-Norm baseline.

Runs the project's own jitted train step (train_lib.make_train_step: forward, backward, global-norm
clipping and AdamW, state donated) on one device, for each model width d:

  residual Pre-Norm, and SHC / DHC / mHC at n, DFC at m = n, for n in --n

All variants of one width are compiled first, then timed interleaved: every round runs one step
of each variant (in a rotated order) and one fp32 matmul, so machine drift cancels in the ratios
(each variant's ratio is the median over rounds of its step time over the baseline's step time in
the same round). Reported per variant: median step time, ratio to the baseline, tokens/s, model
FLOPs utilisation against the fp32 matmul throughput measured in the same rounds, peak memory of
the compiled step (arguments + outputs + temporaries - donated aliases, from XLA's memory
analysis), compile time; and separately the compile time at several depths and the peak memory
under each remat policy (compile only, nothing is run).

  python benchmarks/bench.py --out=runs/bench.json --markdown=runs/bench.md

See docs/performance.md for the latest results and the exact command.
"""

import argparse
import ast
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from configs import base
from hyperconn_jax import aot, connections, host_malloc, models
from hyperconn_jax import flops as flops_lib
from hyperconn_jax import metrics as metrics_lib
from hyperconn_jax import paths
from hyperconn_jax import sharding, train_lib

BASELINE = 'residual_prenorm'
# --variants: LABEL=KIND/FIELD=VALUE/... sets model.connection.KIND.FIELD; a VALUE of N is replaced
# by each rate of --n. Any registered connection kind works (hyperconn_jax.connections.KINDS).
DEFAULT_VARIANTS = ('SHC=hc/n=N/dynamic=false/tanh=false,DHC=hc/n=N,mHC=mhc/n=N,DFC=frac/m=N')


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str    # e.g. 'DHC'
  kind: str     # config.model.connection.kind
  options: tuple[tuple[str, str], ...] = ()   # (field, value text) of the kind's sub-config
  rate: int = 1   # the value of N

  @property
  def name(self) -> str:
    """The label with the rate, e.g. 'DHC x4' (the bare label without N)."""
    if any(value == 'N' for _, value in self.options):
      return f'{self.label} x{self.rate}'
    return self.label


BASELINE_VARIANT = Variant('Pre-Norm', BASELINE)


def parse_variants(text: str, rates: list[int]) -> list[Variant]:
  """--variants for every rate in --n (variants without N once), rate-major as the tables read."""
  out = []
  for index, spec in enumerate(filter(None, text.split(','))):
    head, sep, rest = spec.partition('=')
    label, body = (head, rest) if sep and '/' not in head else ('', spec)
    kind, *fields = body.split('/')
    options = tuple(tuple(f.split('=', 1)) for f in fields)
    if any(len(o) != 2 for o in options) or kind not in connections.KINDS:
      raise ValueError(f'--variants: {spec!r} must be [LABEL=]KIND[/FIELD=VALUE...] with KIND one '
                       f'of {tuple(connections.KINDS)}')
    uses_rate = any(value == 'N' for _, value in options)
    for rate in (rates if uses_rate else [1]):
      out.append((rate, index, Variant(label or kind, kind, options, rate)))
  return list(dict.fromkeys(v for _, _, v in sorted(out, key=lambda x: x[:2])))


def _value(text: str, rate: int):
  if text == 'N':
    return rate
  try:
    return ast.literal_eval({'true': 'True', 'false': 'False'}.get(text, text))
  except (ValueError, SyntaxError):
    return text  # A string option, e.g. reduce=head.


def heads_of(d: int) -> tuple[int, int]:
  """(heads, head_dim) of the benchmarked models at width d: heads of 64 channels."""
  return max(1, d // 64), min(64, d)


def make_config(variant: Variant, *, d: int, layers: int, seq: int, batch: int,
                remat_policy: str):
  """The full config of one benchmarked model (heads of 64 channels, SwiGLU 4d, byte vocabulary).

  A kind whose embedding is wider than d (vwn) gets an untied unembedding."""
  c = base.get_config()
  heads, head_dim = heads_of(d)
  c.model.update(dict(vocab_size=256, d_model=d, num_layers=layers, num_heads=heads,
                      head_dim=head_dim, mlp_dim=4 * d, dtype='float32',
                      param_dtype='float32', scan_layers=True, remat_policy=remat_policy))
  conn = c.model.connection
  conn.kind = variant.kind
  for field, text in variant.options:
    conn[variant.kind][field] = _value(text, variant.rate)
  c.model.tie_embeddings = connections.layout(conn, d).embed_width == d
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.train.num_steps = 1_000_000  # Only the schedule reads it.
  c.mesh.shape = (1, 1, 1)
  c.lock()
  return c


def skip_reason(config) -> str | None:
  """Why a variant cannot be built at this width (its validation message), or None."""
  try:
    models.validate(config.model)
  except ValueError as e:
    return str(e)
  return None


class Compiled:
  """One variant's compiled train step, its state and a fixed random batch."""

  def __init__(self, config, *, allocate: bool):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.logical_rules(config.mesh)
    self.config = config
    with sharding.activate(mesh, rules):
      self.setup = train_lib.make_setup(config, mesh, rules)
      step = train_lib.make_train_step(config, self.setup)
      start, start_cpu = time.perf_counter(), time.process_time()
      self.step = step.lower(train_lib.abstract_train_state(self.setup),
                             train_lib.abstract_batch(config, self.setup)).compile()
      self.compile_s = time.perf_counter() - start
      self.compile_cpu_s = time.process_time() - start_cpu
      self.memory = aot.memory_of(self.step)
      if not allocate:
        return
      self.state = train_lib.init_state(config, self.setup)
    shape = (config.train.batch_size, config.data.seq_len)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (shape[0], shape[1] + 1), dtype=np.int32)
    self.batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                                 'weights': np.ones(shape, np.float32)},
                                self.setup.batch_sharding)

  def run(self) -> tuple[float, float]:
    """Runs one step; returns its wall time and the process's CPU time (all threads) in seconds,
    from dispatch to all outputs ready."""
    start, start_cpu = time.perf_counter(), time.process_time()
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if not np.isfinite(float(metrics['loss'])):
      raise FloatingPointError(f'non-finite loss in {self.config.model.connection.kind}')
    return elapsed, elapsed_cpu


class Matmul:
  """A jitted fp32 [S, S] x [S, S] product: the machine's reference matmul throughput."""

  def __init__(self, size: int):
    keys = jax.random.split(jax.random.key(0), 2)
    self.a = jax.random.normal(keys[0], (size, size), jnp.float32)
    self.b = jax.random.normal(keys[1], (size, size), jnp.float32)
    self.flops = 2.0 * size ** 3
    self.fn = jax.jit(jnp.dot)
    jax.block_until_ready(self.fn(self.a, self.b))

  def run(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.fn(self.a, self.b))
    return time.perf_counter() - start


def time_width(d: int, variants: list[Variant], args, matmul: Matmul) -> list[dict]:
  """Compiles every variant at width d, then times them interleaved; returns one row each."""
  baseline = BASELINE_VARIANT
  members, rows = [], []
  for variant in [baseline] + [v for v in variants if v != baseline]:
    config = make_config(variant, d=d, layers=args.layers, seq=args.seq, batch=args.batch,
                         remat_policy=args.remat_policy)
    reason = skip_reason(config)
    if reason:
      rows.append({'d': d, 'variant': variant.kind, 'rate': variant.rate,
                   'label': variant.name, 'skipped': reason})
      continue
    compiled = Compiled(config, allocate=True)
    for _ in range(args.warmup):
      compiled.run()
    members.append((variant, compiled))
    print(f'  d={d} {variant.name}: compiled in {compiled.compile_s:.1f}s, peak '
          f'{compiled.memory["peak_bytes"] / 2**20:.0f} MiB', flush=True)

  times = {v: [] for v, _ in members}
  cpu_times = {v: [] for v, _ in members}
  matmul_s = []
  for r in range(args.steps):
    order = members[r % len(members):] + members[:r % len(members)]
    for variant, compiled in order:
      wall, cpu = compiled.run()
      times[variant].append(wall)
      cpu_times[variant].append(cpu)
    matmul_s.append(matmul.run())
  base_times = np.asarray(times[baseline])
  base_cpu = np.asarray(cpu_times[baseline])
  matmul_flops_per_s = matmul.flops / np.asarray(matmul_s)
  for variant, compiled in members:
    t = np.asarray(times[variant])
    cpu = np.asarray(cpu_times[variant])
    flops = flops_lib.model_flops_per_step(compiled.config)
    tokens = args.batch * args.seq
    rows.append({
        'd': d, 'variant': variant.kind, 'rate': variant.rate, 'label': variant.name,
        'layers': args.layers, 'seq': args.seq, 'batch': args.batch,
        'remat_policy': args.remat_policy,
        'step_s_median': float(np.median(t)),
        'step_s_all': [float(x) for x in t],
        'ratio_to_residual': float(np.median(t / base_times)),
        'step_cpu_s_median': float(np.median(cpu)),
        'cpu_ratio_to_residual': float(np.median(cpu / base_cpu)),
        'tokens_per_s': float(tokens / np.median(t)),
        'model_flops_per_step': flops,
        'mfu': float(np.median(flops / t / matmul_flops_per_s)),
        'matmul_flops_per_s_median': float(np.median(matmul_flops_per_s)),
        'compile_s': compiled.compile_s,
        **compiled.memory,
    })
  base_peak = next(r['peak_bytes'] for r in rows if r['variant'] == BASELINE and 'peak_bytes' in r)
  for row in rows:
    if 'peak_bytes' in row:
      row['peak_ratio_to_residual'] = row['peak_bytes'] / base_peak
  return rows


def compile_depths(args) -> list[dict]:
  """Compile time of the train step at each depth in --compile_layers: the minimum over
  --compile_repeats interleaved repeats (wall clock and process CPU time)."""
  cases = [(variant, layers) for variant in _reference_variants()
           for layers in args.compile_layers]
  wall = {case: [] for case in cases}
  cpu = {case: [] for case in cases}
  for _ in range(args.compile_repeats):
    for variant, layers in cases:
      config = make_config(variant, d=args.compile_d, layers=layers, seq=args.seq,
                           batch=args.batch, remat_policy=args.remat_policy)
      compiled = Compiled(config, allocate=False)
      cpu[variant, layers].append(compiled.compile_cpu_s)
      wall[variant, layers].append(compiled.compile_s)
      print(f'  compile {variant.name} L={layers}: {compiled.compile_s:.1f}s', flush=True)
  return [{'variant': variant.kind, 'rate': variant.rate, 'label': variant.name,
           'd': args.compile_d, 'layers': layers, 'compile_s': min(wall[variant, layers]),
           'compile_cpu_s': min(cpu[variant, layers]), 'compile_s_all': wall[variant, layers]}
          for variant, layers in cases]


def _reference_variants() -> list[Variant]:
  """Pre-Norm, DHC x4 and mHC x4: the compile-time and memory comparisons."""
  return [BASELINE_VARIANT] + parse_variants('DHC=hc/n=N,mHC=mhc/n=N', [4])


def remat_memory(args) -> list[dict]:
  """Peak memory of residual and DHC x4 under each remat policy in --memory_policies."""
  rows = []
  for d in args.memory_d:
    for variant in _reference_variants():
      for policy in args.memory_policies:
        config = make_config(variant, d=d, layers=args.layers, seq=args.seq, batch=args.batch,
                             remat_policy=policy)
        compiled = Compiled(config, allocate=False)
        rows.append({'variant': variant.kind, 'rate': variant.rate, 'label': variant.name, 'd': d,
                     'layers': args.layers, 'batch': args.batch, 'remat_policy': policy,
                     **compiled.memory})
  for row in rows:
    base = next(r for r in rows if r['d'] == row['d'] and r['variant'] == BASELINE
                and r['remat_policy'] == 'none')
    row['peak_ratio_to_residual_none'] = row['peak_bytes'] / base['peak_bytes']
    same = next(r for r in rows if r['d'] == row['d'] and r['variant'] == BASELINE
                and r['remat_policy'] == row['remat_policy'])
    row['peak_ratio_to_residual_same_policy'] = row['peak_bytes'] / same['peak_bytes']
  return rows


def machine() -> dict:
  cpu = metrics_lib.host_facts()['cpu']
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, check=False).stdout.strip()
  except OSError:
    commit = ''
  return {'platform': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
          'cpu': cpu, 'cpu_count': os.cpu_count(), 'load_average': list(os.getloadavg()),
          'jax': jax.__version__, 'python': platform.python_version(), 'commit': commit,
          'time_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime())}


def _mib(x: float) -> str:
  return f'{x / 2**20:,.0f}'


def markdown(results: list[dict]) -> str:
  """One or more results (e.g. one per width, see benchmarks/report.py) as markdown tables."""
  timing = [r for res in results for r in res['timing']]
  remat = [r for res in results for r in res['remat_memory']]
  compile_rows = [r for res in results for r in res['compile']]
  lines = []
  if timing:
    a = next(res['args'] for res in results if res['timing'])
    lines += [f"Train step (forward, backward, AdamW), fp32, sequence {a['seq']}, remat "
              f"'{a['remat_policy']}'; median of {a['steps']} interleaved rounds after "
              f"{a['warmup']} warm-up steps; 'x res' is the median over rounds of the ratio to "
              "the residual step of the same round (wall clock; CPU: process CPU time); MFU "
              f"against the fp32 matmul ({a['matmul_size']}^3) timed in the same rounds.", '',
              '| d | layers x batch | variant | step ms | x res | x res (CPU) | tokens/s | MFU '
              '| peak MiB | x res | compile s |',
              '|---:|:---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in timing:
      if 'skipped' in r:
        lines.append(f"| {r['d']} | | {r['label']} | - | - | - | - | - | - | - | - |")
        continue
      lines.append(f"| {r['d']} | {r['layers']} x {r['batch']} | {r['label']} | "
                   f"{1e3 * r['step_s_median']:.0f} | {r['ratio_to_residual']:.3f} | "
                   f"{r['cpu_ratio_to_residual']:.3f} | {r['tokens_per_s']:,.0f} | "
                   f"{r['mfu']:.1%} | {_mib(r['peak_bytes'])} | "
                   f"{r['peak_ratio_to_residual']:.3f} | {r['compile_s']:.1f} |")
    lines.append('')
    for d in dict.fromkeys(r['d'] for r in timing if 'mfu' in r):
      gf = next(r['matmul_flops_per_s_median'] for r in timing if r['d'] == d and 'mfu' in r)
      lines.append(f'fp32 matmul throughput measured alongside d = {d}: {gf / 1e9:.1f} GFLOP/s.')
  if remat:
    lines += ['', 'Peak memory of the compiled train step by remat policy (compile only; '
              f"{remat[0]['layers']} layers, batch {remat[0]['batch']}):", '',
              '| d | variant | remat | peak MiB | temp MiB | x residual (none) | '
              'x residual (same policy) |',
              '|---:|:---|:---|---:|---:|---:|---:|']
    for r in remat:
      lines.append(f"| {r['d']} | {r['label']} | {r['remat_policy']} | {_mib(r['peak_bytes'])} | "
                   f"{_mib(r['temp_bytes'])} | {r['peak_ratio_to_residual_none']:.3f} | "
                   f"{r['peak_ratio_to_residual_same_policy']:.3f} |")
  if compile_rows:
    depths = list(dict.fromkeys(r['layers'] for r in compile_rows))
    lines += ['', f"Compile time (lower + compile, wall clock, best of repeats) of the train step by "
              f"depth (d = {compile_rows[0]['d']}):", '',
              '| variant | ' + ' | '.join(f'{l} layers' for l in depths) + ' | last / first |',
              '|:---|' + '---:|' * (len(depths) + 1)]
    for label in dict.fromkeys(r['label'] for r in compile_rows):
      secs = [r['compile_s'] for r in compile_rows if r['label'] == label]
      lines.append(f'| {label} | ' + ' | '.join(f'{s:.1f} s' for s in secs)
                   + f' | {secs[-1] / secs[0]:.2f} |')
  return '\n'.join(lines) + '\n'


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--d', type=_ints, default=[256, 512, 1024], help='model widths')
  p.add_argument('--n', type=_ints, default=[1, 2, 4, 8], help='expansion / frac rates')
  p.add_argument('--variants', default=DEFAULT_VARIANTS,
                 help='comma-separated LABEL=KIND/FIELD=VALUE/...: model.connection.KIND.FIELD, '
                 'VALUE N is each of --n (the Pre-Norm baseline always runs)')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--steps', type=int, default=20, help='timed interleaved rounds')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--remat_policy', default='none', help='model.remat_policy of the timed steps')
  p.add_argument('--matmul_size', type=int, default=2048)
  p.add_argument('--compile_layers', type=_ints, default=[4, 16],
                 help='depths of the compile-time comparison (empty: skip)')
  p.add_argument('--compile_d', type=int, default=256)
  p.add_argument('--compile_repeats', type=int, default=2)
  p.add_argument('--memory_policies', default='none,save_streams,full',
                 help='remat policies of the memory comparison (empty: skip)')
  p.add_argument('--memory_d', type=_ints, default=[256, 512, 1024],
                 help='widths of the memory comparison')
  p.add_argument('--out', default='', help='JSON output path')
  p.add_argument('--markdown', default='', help='markdown output path')
  args = p.parse_args(argv)
  try:
    args.variants = parse_variants(args.variants, args.n)
  except ValueError as e:
    p.error(str(e))
  args.memory_policies = [x for x in args.memory_policies.split(',') if x]
  return args


def write_outputs(json_path: str, result, markdown_path: str, table: str) -> None:
  """Writes `result` as JSON and the markdown `table`, each where its path (a local path or a
  gs:// URL) is not empty."""
  for path, text in ((json_path, json.dumps(result, indent=1)), (markdown_path, table)):
    if path:
      out = paths.as_path(path)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(text)


def main(argv=None):
  args = parse_args(argv)
  # As train.py does, before JAX starts its threads.
  applied = host_malloc.configure(base.get_config().train.host_malloc)
  result = {'machine': {**machine(), 'host_malloc': applied},
            'args': {**vars(args), 'variants': [v.name for v in args.variants]},
            'command': ' '.join(sys.argv),
            'timing': [], 'remat_memory': [], 'compile': []}
  matmul = Matmul(args.matmul_size)
  for d in args.d:
    print(f'width {d}', flush=True)
    result['timing'] += time_width(d, args.variants, args, matmul)
  if args.memory_policies:
    result['remat_memory'] = remat_memory(args)
  if args.compile_layers:
    result['compile'] = compile_depths(args)
  result['machine']['load_average_end'] = list(os.getloadavg())
  table = markdown([result])
  print(table)
  write_outputs(args.out, result, args.markdown, table)


if __name__ == '__main__':
  main()
