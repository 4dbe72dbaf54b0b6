"""Our train step against PyTorch eager on the same CPU: residual, and HC x4 from the public
`hyper-connections` package (lucidrains, 0.4.11) against our DHC x4.

The PyTorch models have bench.py's shapes: a pre-norm decoder (LayerNorm without affine, RoPE,
causal attention through `F.scaled_dot_product_attention`, heads of 64 channels, SwiGLU 4d, no
biases), byte vocabulary, tied embeddings, float32; the step is forward, cross-entropy, backward,
global-norm clipping at 1 and `torch.optim.AdamW` (weight decay 0.1 on the matrices only, as our
default config). HC x4 wraps each sub-layer with the package's `HyperConnections` (n = 4, its
defaults: dynamic, tanh, RMSNorm on the streams; streams folded into the batch, as the package
does) and expands / reduces with its stream functions.

For each width d, all four steps (JAX residual and DHC x4 from bench.Compiled, i.e. the project's
own jitted train step; PyTorch residual and HC x4) are built and warmed up, then timed
interleaved in one process: every round runs one step of each, in a rotated order, so machine
drift cancels in the ratios (each ratio is the median over rounds of the ratio within a round).

  pip install --no-deps -r benchmarks/requirements-peer.txt
  python benchmarks/peer_torch.py --out=runs/peer_torch.json --markdown=runs/peer_torch.md

PyTorch is an optional dependency of this script only (benchmarks/requirements-peer.txt).
See docs/performance.md for the latest results and the exact command.
"""

import argparse
import importlib.metadata
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=g-import-not-at-top
import torch
from torch import nn
import torch.nn.functional as F
import hyper_connections

import bench

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
    heads, head_dim = max(1, d // 64), min(64, d)
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


def time_width(d: int, args) -> list[dict]:
  """Builds the four steps at width d, times them interleaved; one row each."""
  shape = dict(layers=args.layers, seq=args.seq, batch=args.batch)
  members = []
  for name, variant in (('JAX residual', bench.BASELINE_VARIANT),
                        (f'JAX DHC x{HC_RATE}', bench.parse_variants('DHC=hc/n=N', [HC_RATE])[0])):
    compiled = bench.Compiled(bench.make_config(variant, d=d, remat_policy='none', **shape),
                              allocate=True)
    members.append((name, compiled))
  members.append(('PyTorch residual', TorchStep(d=d, hc_rate=0, **shape)))
  members.append((f'PyTorch HC x{HC_RATE}', TorchStep(d=d, hc_rate=HC_RATE, **shape)))
  for name, step in members:
    for _ in range(args.warmup):
      step.run()
    print(f'  d={d} {name}: ready', flush=True)
  wall = {name: [] for name, _ in members}
  cpu = {name: [] for name, _ in members}
  for r in range(args.steps):
    for name, step in members[r % len(members):] + members[:r % len(members)]:
      w, c = step.run()
      wall[name].append(w)
      cpu[name].append(c)
  base = {'JAX': np.asarray(wall['JAX residual']), 'PyTorch': np.asarray(wall['PyTorch residual'])}
  torch_of = {'JAX residual': 'PyTorch residual',
              f'JAX DHC x{HC_RATE}': f'PyTorch HC x{HC_RATE}'}
  rows = []
  for name, _ in members:
    t = np.asarray(wall[name])
    row = {'d': d, 'name': name, **shape, 'step_s_median': float(np.median(t)),
           'step_s_all': [float(x) for x in t], 'step_cpu_s_median': float(np.median(cpu[name])),
           'tokens_per_s': float(args.batch * args.seq / np.median(t)),
           'ratio_to_own_residual': float(np.median(t / base[name.split()[0]]))}
    if name in torch_of:
      row['ratio_to_pytorch'] = float(np.median(t / np.asarray(wall[torch_of[name]])))
    rows.append(row)
  return rows


def markdown(result: dict) -> str:
  """The side-by-side table (one line per width) of a result of this script."""
  a = result['args']
  lines = [f"Train step (forward, backward, clipping, AdamW), fp32, {a['layers']} layers x batch "
           f"{a['batch']} x sequence {a['seq']}; median of {a['steps']} interleaved rounds after "
           f"{a['warmup']} warm-up steps; ratios are medians over rounds of the ratio within a "
           'round.', '',
           '| d | JAX residual s | PyTorch residual s | JAX / PyTorch | JAX DHC x4 tok/s | '
           'PyTorch HC x4 tok/s | DHC / HC tok/s | JAX DHC x4 / res | PyTorch HC x4 / res |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for d in sorted({r['d'] for r in result['rows']}):
    by = {r['name']: r for r in result['rows'] if r['d'] == d}
    jr, tr = by['JAX residual'], by['PyTorch residual']
    jh, th = by[f'JAX DHC x{HC_RATE}'], by[f'PyTorch HC x{HC_RATE}']
    lines.append(f"| {d} | {jr['step_s_median']:.3f} | {tr['step_s_median']:.3f} | "
                 f"{jr['ratio_to_pytorch']:.2f} | {jh['tokens_per_s']:,.0f} | "
                 f"{th['tokens_per_s']:,.0f} | {1 / jh['ratio_to_pytorch']:.2f} | "
                 f"{jh['ratio_to_own_residual']:.3f} | {th['ratio_to_own_residual']:.3f} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--d', default='256,512,1024', help='comma-separated model widths')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--steps', type=int, default=10, help='interleaved timing rounds')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--out', default='', help='JSON output path')
  p.add_argument('--markdown', default='', help='markdown output path')
  args = p.parse_args(argv)
  result = {'args': vars(args), 'machine': bench.machine(), 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(),
            'hyper_connections': importlib.metadata.version('hyper-connections'), 'rows': []}
  for d in [int(x) for x in args.d.split(',')]:
    result['rows'] += time_width(d, args)
    result['machine']['load_average_end'] = list(os.getloadavg())
    table = markdown(result)
    print(table, flush=True)
    # Written after every width, so a long run keeps what it measured.
    bench.write_outputs(args.out, result, args.markdown, table)


if __name__ == '__main__':
  main()
