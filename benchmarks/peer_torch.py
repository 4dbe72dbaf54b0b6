"""Our train step against PyTorch eager on the same CPU: residual, and HC x4 from the public
`hyper-connections` package (lucidrains, 0.4.11) against our DHC x4.

The PyTorch models have bench.py's shapes: a pre-norm decoder (LayerNorm without affine, RoPE,
causal attention through `F.scaled_dot_product_attention`, heads of 64 channels, SwiGLU 4d, no
biases), byte vocabulary, tied embeddings, float32; the step is forward, cross-entropy, backward,
global-norm clipping at 1 and `torch.optim.AdamW` (weight decay 0.1 on the matrices only, as our
default config). HC x4 wraps each sub-layer with the package's `HyperConnections` (n = 4, its
defaults: dynamic, tanh, RMSNorm on the streams; streams folded into the batch, as the package
does) and expands / reduces with its stream functions.

For each width d, the steps (JAX residual and DHC x4 from bench.Compiled, i.e. the project's own
jitted train step; PyTorch residual and HC x4) are built and warmed up, then timed interleaved:
every round runs one step of each, in a rotated order, so machine drift cancels in the ratios
(each ratio is the median over rounds of the ratio within a round). Each timed step or GEMM call
follows --pause seconds of idle: the worker threads of the one before (PyTorch's OpenMP team,
XLA's pool) spin-wait for a while after their work and would otherwise slow the next one down
(without it, XLA's GEMMs timed right after torch.matmul measured 1.48-1.66x torch's time at
d = 256; with 0.2 s, 1.18-1.26x). JAX runs in this process with train.host_malloc applied as
train.py applies it; PyTorch runs in a process of its own, driven from this one, with glibc's
malloc as PyTorch users get it ('system'), and with --torch_malloc containing 'reuse' also in a
second process with our malloc setting (which speeds it up too).

After each width's steps (--gemm_only: instead of them) come two tables of single products, both
libraries in this process: one layer's dense GEMMs (a jitted jnp.dot against torch.matmul), and
attention's per-head batched matmuls (a jitted jnp.matmul against torch.bmm with its threads and
with one), with the cores each keeps busy.

  pip install --no-deps -r benchmarks/requirements-peer.txt
  python benchmarks/peer_torch.py --out=runs/peer_torch.json --markdown=runs/peer_torch.md

PyTorch is an optional dependency of this script only (benchmarks/requirements-peer.txt).
See docs/performance.md for the latest results and the exact command.
"""

import argparse
import importlib.metadata
import math
import multiprocessing
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import hyper_connections

import bench
from configs import base
from hyperconn_jax import host_malloc

HC_RATE = 4


class Rope(nn.Module):
  """Rotate-half RoPE over [B, H, L, K] (as hyperconn_jax.models.layers.rope)."""

  def __init__(self, seq: int, head_dim: int, theta: float = 10000.0):
    super().__init__()
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    self.register_buffer('cos', torch.cos(angles), persistent=False)
    self.register_buffer('sin', torch.sin(angles), persistent=False)

  def forward(self, x):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)


class Attention(nn.Module):
  """Pre-norm causal self-attention, heads of 64 channels, no biases."""

  def __init__(self, d: int, heads: int, head_dim: int, rope: Rope):
    super().__init__()
    self.heads, self.head_dim, self.rope = heads, head_dim, rope
    self.norm = nn.LayerNorm(d, eps=1e-5, elementwise_affine=False)
    self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
    self.o = nn.Linear(heads * head_dim, d, bias=False)

  def forward(self, x):
    b, l, _ = x.shape
    qkv = self.qkv(self.norm(x)).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = self.rope(qkv[0]), self.rope(qkv[1]), qkv[2]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.o(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))


class SwiGLU(nn.Module):
  """Pre-norm SwiGLU MLP down(silu(gate(y)) * up(y)), hidden 4d, no biases."""

  def __init__(self, d: int, hidden: int):
    super().__init__()
    self.norm = nn.LayerNorm(d, eps=1e-5, elementwise_affine=False)
    self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
    self.down = nn.Linear(hidden, d, bias=False)

  def forward(self, x):
    gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
    return self.down(F.silu(gate) * up)


class Decoder(nn.Module):
  """Byte-level pre-norm decoder with tied embeddings; `hc_rate` > 0 wraps every sub-layer in
  the package's HyperConnections with that many streams."""

  def __init__(self, *, d: int, layers: int, seq: int, hc_rate: int = 0, vocab: int = 256):
    super().__init__()
    heads, head_dim = bench.heads_of(d)
    rope = Rope(seq, head_dim)
    self.embed = nn.Embedding(vocab, d)
    nn.init.normal_(self.embed.weight, std=0.02)
    branches = []
    for _ in range(layers):
      branches += [Attention(d, heads, head_dim, rope), SwiGLU(d, 4 * d)]
    self.hc = hc_rate > 0
    if self.hc:
      init_hc, self.expand, self.reduce = (
          hyper_connections.get_init_and_expand_reduce_stream_functions(hc_rate))
      self.sublayers = nn.ModuleList(init_hc(dim=d, branch=b, layer_index=i)
                                     for i, b in enumerate(branches))
    else:
      self.sublayers = nn.ModuleList(branches)
    self.final_norm = nn.LayerNorm(d, eps=1e-5, elementwise_affine=False)

  def forward(self, tokens):
    x = self.embed(tokens)
    if self.hc:
      x = self.expand(x)
      for sublayer in self.sublayers:
        x = sublayer(x)
      x = self.reduce(x)
    else:
      for sublayer in self.sublayers:
        x = x + sublayer(x)
    return self.final_norm(x) @ self.embed.weight.T


class TorchStep:
  """One PyTorch model with AdamW and a fixed random batch (seeded as bench.Compiled's)."""

  def __init__(self, *, d: int, layers: int, seq: int, batch: int, hc_rate: int):
    torch.manual_seed(0)
    self.model = Decoder(d=d, layers=layers, seq=seq, hc_rate=hc_rate)
    decay = [p for p in self.model.parameters() if p.ndim >= 2 and p is not self.model.embed.weight]
    rest = [p for p in self.model.parameters() if not any(p is q for q in decay)]
    self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1},
                                  {'params': rest, 'weight_decay': 0.0}],
                                 lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, 256, (batch, seq + 1)).astype(np.int64))
    self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

  def run(self) -> tuple[float, float]:
    """One step; (wall, process CPU) seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    logits = self.model(self.inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    value = loss.item()
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if not math.isfinite(value):
      raise FloatingPointError('non-finite PyTorch loss')
    return elapsed, elapsed_cpu


def _torch_worker(conn, malloc: str, shape: dict) -> None:
  """A PyTorch process (spawned, so its malloc starts at glibc's defaults; `malloc` is
  train.host_malloc's choice for it): ('build', d) builds residual and HC steps at width d,
  ('run', name) runs one and sends back (wall, CPU) seconds, None ends it."""
  host_malloc.configure(malloc)
  steps = {}
  for command, arg in iter(conn.recv, None):
    if command == 'build':
      steps = {'residual': TorchStep(d=arg, hc_rate=0, **shape),
               f'HC x{HC_RATE}': TorchStep(d=arg, hc_rate=HC_RATE, **shape)}
      conn.send(None)
    else:
      conn.send(steps[arg].run())


class TorchProcess:
  """PyTorch steps in their own process, driven from this one (so the two frameworks alternate
  on the CPU, each with its own allocator settings)."""

  def __init__(self, malloc: str, shape: dict):
    context = multiprocessing.get_context('spawn')
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_torch_worker, args=(child, malloc, shape), daemon=True)
    self.process.start()

  def build(self, d: int) -> None:
    self.conn.send(('build', d))
    self.conn.recv()

  def step(self, name: str):
    """An object whose run() runs step `name` ('residual', 'HC x4') in the PyTorch process."""
    return types.SimpleNamespace(run=lambda: self._run(name))

  def _run(self, name: str) -> tuple[float, float]:
    self.conn.send(('run', name))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send(None)
    self.process.join()


def time_width(d: int, args, torch_processes: dict) -> list[dict]:
  """Builds the steps at width d (ours here; PyTorch's in `torch_processes`, one per malloc
  mode), times them interleaved; one row each."""
  shape = dict(layers=args.layers, seq=args.seq, batch=args.batch)
  members = []
  for name, variant in (('JAX residual', bench.BASELINE_VARIANT),
                        (f'JAX DHC x{HC_RATE}', bench.parse_variants('DHC=hc/n=N', [HC_RATE])[0])):
    compiled = bench.Compiled(bench.make_config(variant, d=d, remat_policy='none', **shape),
                              allocate=True)
    members.append((name, compiled))
  for malloc, process in torch_processes.items():
    process.build(d)
    for model in ('residual', f'HC x{HC_RATE}'):
      members.append((_torch_name(model, malloc), process.step(model)))
  for name, step in members:
    for _ in range(args.warmup):
      step.run()
    print(f'  d={d} {name}: ready', flush=True)
  wall = {name: [] for name, _ in members}
  cpu = {name: [] for name, _ in members}
  for r in range(args.steps):
    for name, step in members[r % len(members):] + members[:r % len(members)]:
      time.sleep(args.pause)
      w, c = step.run()
      wall[name].append(w)
      cpu[name].append(c)
  rows = []
  for name, _ in members:
    t = np.asarray(wall[name])
    own_residual = name.replace(f'DHC x{HC_RATE}', 'residual').replace(f'HC x{HC_RATE}',
                                                                          'residual')
    row = {'d': d, 'name': name, **shape, 'step_s_median': float(np.median(t)),
           'step_s_all': [float(x) for x in t], 'step_cpu_s_median': float(np.median(cpu[name])),
           'tokens_per_s': float(args.batch * args.seq / np.median(t)),
           'ratio_to_own_residual': float(np.median(t / np.asarray(wall[own_residual])))}
    if name.startswith('JAX'):
      model = 'residual' if name == 'JAX residual' else f'HC x{HC_RATE}'
      row['ratio_to_pytorch'] = {
          malloc: float(np.median(t / np.asarray(wall[_torch_name(model, malloc)])))
          for malloc in torch_processes}
    rows.append(row)
  return rows


def gemm_shapes(d: int, tokens: int) -> list[tuple[int, int, int]]:
  """(M, K, N) of the dense products of one layer's MLP (d -> 4d -> d) and one d x d attention
  projection: forward x W, input gradient g W^T and weight gradient x^T g of each."""
  f = 4 * d
  return [(tokens, d, f), (tokens, f, d), (d, tokens, f),   # MLP up (and gate)
          (tokens, f, d), (tokens, d, f), (f, tokens, d),   # MLP down
          (tokens, d, d), (tokens, d, d), (d, tokens, d)]   # q, k, v or o


def _time_calls(calls: dict, args, cores: bool = False) -> dict:
  """Each of `calls` ({name: function}) args.gemm_rounds times, interleaved, after args.pause s
  idle each: {name: median seconds}, or with `cores` {name: (median seconds, cores)}, cores being
  process CPU time / wall time over 0.5 s of back-to-back calls (2.0: both cores of this machine
  busy; the process CPU clock counts other threads' time only every few milliseconds, so one
  short call cannot tell)."""
  seconds = {name: [] for name in calls}
  for call in calls.values():  # Compiled and warm before timing.
    call()
  for _ in range(args.gemm_rounds):
    for name, call in calls.items():
      time.sleep(args.pause)
      start = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - start)
  medians = {name: float(np.median(seconds[name])) for name in calls}
  if not cores:
    return medians
  busy = {}
  for name, call in calls.items():
    time.sleep(args.pause)
    cpu, start = time.process_time(), time.perf_counter()
    while time.perf_counter() - start < 0.5:
      call()
    busy[name] = (time.process_time() - cpu) / (time.perf_counter() - start)
  return {name: (medians[name], busy[name]) for name in calls}


def time_gemms(d: int, args) -> dict:
  """The fp32 GEMMs of gemm_shapes, XLA:CPU (a jitted jnp.dot) against torch.matmul, both in
  this process (the same allocator), interleaved; summed medians over args.gemm_rounds."""
  xla_s = torch_s = flops = 0.0
  rng = np.random.default_rng(0)
  dot = jax.jit(jnp.dot)
  for m, k, n in gemm_shapes(d, args.batch * args.seq):
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    xla_a, xla_b = jnp.asarray(a), jnp.asarray(b)
    torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
    timed = _time_calls({'xla': lambda: dot(xla_a, xla_b).block_until_ready(),
                         'torch': lambda: torch.matmul(torch_a, torch_b)}, args)
    xla_s += timed['xla']
    torch_s += timed['torch']
    flops += 2.0 * m * k * n
  return {'d': d, 'xla_s': xla_s, 'torch_s': torch_s, 'xla_gflops': flops / xla_s / 1e9,
          'torch_gflops': flops / torch_s / 1e9, 'xla_over_torch': xla_s / torch_s}


def head_products(d: int, batch: int, seq: int) -> list[tuple[str, tuple, tuple]]:
  """(name, lhs shape, rhs shape) of dense causal attention's per-head batched matmuls in the
  forward pass (batch x heads products each): scores q k^T and the output p v."""
  heads, head_dim = bench.heads_of(d)
  n = batch * heads
  return [('q k^T', (n, seq, head_dim), (n, head_dim, seq)),
          ('p v', (n, seq, seq), (n, seq, head_dim))]


def time_head_products(d: int, args) -> list[dict]:
  """Attention's per-head products (head_products) as batched matmuls: XLA:CPU (a jitted
  jnp.matmul) against torch.bmm with its threads and with one thread; median time and cores of
  each (see _time_calls)."""
  rows = []
  rng = np.random.default_rng(0)
  matmul = jax.jit(jnp.matmul)
  threads = torch.get_num_threads()
  for name, lhs, rhs in head_products(d, args.batch, args.seq):
    a, b = rng.standard_normal(lhs, np.float32), rng.standard_normal(rhs, np.float32)
    xla_a, xla_b = jnp.asarray(a), jnp.asarray(b)
    torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
    timed = _time_calls({'xla': lambda: matmul(xla_a, xla_b).block_until_ready(),
                         'torch': lambda: torch.bmm(torch_a, torch_b)}, args, cores=True)
    torch.set_num_threads(1)
    try:
      timed['torch_1_thread'] = _time_calls({'t': lambda: torch.bmm(torch_a, torch_b)}, args,
                                            cores=True)['t']
    finally:
      torch.set_num_threads(threads)
    gflop = 2.0 * math.prod(lhs) * rhs[-1] / 1e9
    rows.append({'d': d, 'product': name, 'lhs': lhs, 'rhs': rhs, 'gflop': gflop,
                 **{f'{impl}_s': s for impl, (s, _) in timed.items()},
                 **{f'{impl}_cores': c for impl, (_, c) in timed.items()}})
  return rows


def _torch_name(model: str, malloc: str) -> str:
  """'PyTorch residual' (glibc's default malloc, as PyTorch runs) or 'PyTorch residual, malloc
  reuse'."""
  return f'PyTorch {model}' + ('' if malloc == 'system' else f', malloc {malloc}')


def markdown(result: dict) -> str:
  """The side-by-side table (one line per width) of a result of this script: PyTorch as it runs
  by default (glibc's malloc untouched), and its residual step with our malloc setting too."""
  a = result['args']
  reuse = 'reuse' in a['torch_malloc'].split(',')
  lines = [f"Train step (forward, backward, clipping, AdamW), fp32, {a['layers']} layers x batch "
           f"{a['batch']} x sequence {a['seq']}; median of {a['steps']} interleaved rounds after "
           f"{a['warmup']} warm-up steps, {a['pause']} s idle before each; ratios are medians "
           f"over rounds of the ratio within a round. JAX with "
           f"train.host_malloc={result['host_malloc']!r}, as train.py runs; "
           'PyTorch in its own process with glibc malloc as it comes'
           + (' (and, in the last two columns, with malloc reuse like ours).' if reuse else '.'),
           '', '| d | JAX residual s | PyTorch residual s | JAX / PyTorch | JAX DHC x4 tok/s | '
           'PyTorch HC x4 tok/s | DHC / HC tok/s | JAX DHC x4 / res | PyTorch HC x4 / res |'
           + (' PyTorch residual s, malloc reuse | JAX / PyTorch, malloc reuse |' if reuse else ''),
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|---:|' if reuse else '')]
  if not result['rows']:  # --gemm_only
    lines = []
  for d in sorted({r['d'] for r in result['rows']}):
    by = {r['name']: r for r in result['rows'] if r['d'] == d}
    jr, tr = by['JAX residual'], by['PyTorch residual']
    jh, th = by[f'JAX DHC x{HC_RATE}'], by[f'PyTorch HC x{HC_RATE}']
    line = (f"| {d} | {jr['step_s_median']:.3f} | {tr['step_s_median']:.3f} | "
            f"{jr['ratio_to_pytorch']['system']:.2f} | {jh['tokens_per_s']:,.0f} | "
            f"{th['tokens_per_s']:,.0f} | {1 / jh['ratio_to_pytorch']['system']:.2f} | "
            f"{jh['ratio_to_own_residual']:.3f} | {th['ratio_to_own_residual']:.3f} |")
    if reuse:
      line += (f" {by['PyTorch residual, malloc reuse']['step_s_median']:.3f} | "
               f"{jr['ratio_to_pytorch']['reuse']:.2f} |")
    lines.append(line)
  if result.get('gemms'):
    lines += ['', f"The fp32 GEMMs of one layer's dense products (MLP up, down and one d x d "
              f"projection; forward, input and weight gradients; {a['batch'] * a['seq']} tokens), "
              f"median of {a['gemm_rounds']} interleaved calls each ({a['pause']} s idle before "
              "each), summed, both in this process:",
              '', '| d | XLA:CPU ms | GFLOP/s | torch.matmul ms | GFLOP/s | XLA / torch |',
              '|---:|---:|---:|---:|---:|---:|']
    lines += [f"| {g['d']} | {1e3 * g['xla_s']:.1f} | {g['xla_gflops']:.0f} | "
              f"{1e3 * g['torch_s']:.1f} | {g['torch_gflops']:.0f} | {g['xla_over_torch']:.2f} |"
              for g in result['gemms']]
  if result.get('heads'):
    lines += ['', f"Attention's per-head products (batch x heads batched matmuls, forward; cores: "
              "process CPU time / wall time over 0.5 s of back-to-back calls), median of "
              f"{a['gemm_rounds']} interleaved calls each, both in this process:",
              '', '| d | product | shapes | XLA:CPU ms | cores | torch.bmm ms | cores | '
              'torch.bmm 1 thread ms | XLA / torch |',
              '|---:|:---|:---|---:|---:|---:|---:|---:|---:|']
    lines += [f"| {h['d']} | {h['product']} | {'x'.join(map(str, h['lhs']))} @ "
              f"{'x'.join(map(str, h['rhs'][1:]))} | {1e3 * h['xla_s']:.2f} | "
              f"{h['xla_cores']:.2f} | {1e3 * h['torch_s']:.2f} | {h['torch_cores']:.2f} | "
              f"{1e3 * h['torch_1_thread_s']:.2f} | {h['xla_s'] / h['torch_s']:.2f} |"
              for h in result['heads']]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--d', default='256,512,1024', help='comma-separated model widths')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--steps', type=int, default=10, help='interleaved timing rounds')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--pause', type=float, default=0.2,
                 help='seconds of idle before each timed step or GEMM call, so that the '
                 "previous one's spinning worker threads (OpenMP's, XLA's) have gone to sleep")
  p.add_argument('--gemm_rounds', type=int, default=15,
                 help='calls per product in the XLA vs torch GEMM and per-head product '
                 'tables (0: no tables)')
  p.add_argument('--gemm_only', action='store_true',
                 help='only the GEMM and per-head product tables')
  p.add_argument('--torch_malloc', default='system,reuse',
                 help="PyTorch processes, one per malloc mode: 'system' (as PyTorch runs; "
                 "required, the targets' reference) and optionally 'reuse' (ours)")
  p.add_argument('--out', default='', help='JSON output path')
  p.add_argument('--markdown', default='', help='markdown output path')
  args = p.parse_args(argv)
  mallocs = args.torch_malloc.split(',')
  if 'system' not in mallocs or not set(mallocs) <= {'system', 'reuse'}:
    p.error(f"--torch_malloc must list 'system' and optionally 'reuse', got {args.torch_malloc!r}")
  # As train.py does, before JAX starts its threads.
  applied = host_malloc.configure(base.get_config().train.host_malloc)
  shape = dict(layers=args.layers, seq=args.seq, batch=args.batch)
  torch_processes = ({} if args.gemm_only else
                     {malloc: TorchProcess(malloc, shape) for malloc in mallocs})
  result = {'args': vars(args), 'machine': bench.machine(), 'host_malloc': applied,
            'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
            'hyper_connections': importlib.metadata.version('hyper-connections'), 'rows': [],
            'gemms': [], 'heads': []}
  for d in [int(x) for x in args.d.split(',')]:
    if not args.gemm_only:
      result['rows'] += time_width(d, args, torch_processes)
    # After the steps: at the first width, the PyTorch processes are still starting up before.
    if args.gemm_rounds:
      result['gemms'].append(time_gemms(d, args))
      result['heads'] += time_head_products(d, args)
    result['machine']['load_average_end'] = list(os.getloadavg())
    table = markdown(result)
    print(table, flush=True)
    # Written after every width, so a long run keeps what it measured.
    bench.write_outputs(args.out, result, args.markdown, table)
  for process in torch_processes.values():
    process.close()


if __name__ == '__main__':
  main()
