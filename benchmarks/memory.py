"""Compile-only memory table at paper scale: the real train step (train_lib.make_train_step:
forward, backward, clipping, AdamW; state donated) of an OLMo-sized model, compiled ahead of time
for a TPU topology with libtpu (no TPU needed) or for this host's CPU, and XLA's memory analysis
of it. Nothing is run.

Two tables:
- attention: forward + backward of one attention layer alone (q, k, v of S sequences per chip,
  OLMo-1B heads: 16 x 128, bfloat16), temporaries per sequence, per implementation and length;
- step: the train step per variant (residual Pre-Norm, DHC x4, mHC x4), attention, remat policy,
  stream dtype and length: peak bytes per chip (arguments + outputs + temporaries - donated) and
  temporaries per sequence.

  python benchmarks/memory.py --topology=v5e:4x4 --out=runs/memory.json --markdown=runs/memory.md

The compile helper here is deliberately small (topology devices -> config.mesh -> make_setup ->
lower(abstract state, abstract batch).compile()). See docs/performance.md for the results.
"""

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# libtpu only compiles here: no TPU metadata server to ask, and other processes may hold libtpu.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # pylint: disable=g-import-not-at-top
from jax.experimental import topologies
import jax.numpy as jnp

from configs import lm
from hyperconn_jax import aot, sharding, train_lib
from hyperconn_jax.models import attention

GiB = 2 ** 30
VARIANTS = {'residual': 'connection=residual', 'dhc4': 'connection=hc,n=4,dynamic=true',
            'mhc4': 'connection=mhc,n=4'}
LABELS = {'residual': 'Pre-Norm', 'dhc4': 'DHC x4', 'mhc4': 'mHC x4'}


def devices(topology: str):
  """The devices of a TPU topology ('v5e:4x4', compiled for with libtpu), or 'cpu:N' host CPUs."""
  if topology.startswith('cpu'):
    return jax.devices('cpu')[:int(topology.split(':')[1]) if ':' in topology else 1]
  return topologies.get_topology_desc(platform='tpu', topology_name=topology).devices


def step_config(variant: str, *, length: int, seq_per_chip: int, chips: int, layers: int,
                attention_name: str, policy: str, stream_dtype: str):
  """configs/lm.py's OLMo-1B setup (bfloat16 over float32 weights, mitchell init), on an fsdp
  mesh over all chips, with the given variant, attention, remat policy and stream dtype."""
  c = lm.get_config(f'{VARIANTS[variant]},size=olmo_1b')
  c.unlock()
  c.model.update(dict(num_layers=layers, attention=attention_name, remat_policy=policy,
                      stream_dtype=stream_dtype))
  c.data.seq_len = length
  c.train.batch_size = seq_per_chip * chips
  c.mesh.shape = (1, chips, 1)
  c.lock()
  return c


def compile_step(config, devs):
  """The train step compiled for `devs`; returns aot.memory_of(compiled) and the seconds."""
  mesh = sharding.make_mesh(config.mesh, devs)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    step = train_lib.make_train_step(config, setup)
    start = time.perf_counter()
    compiled = step.lower(train_lib.abstract_train_state(setup), train_lib.abstract_batch(config, setup)
                          ).compile()
  return aot.memory_of(compiled), time.perf_counter() - start


def compile_attention(name: str, *, length: int, seq_per_chip: int, devs):
  """Temporaries (bytes per chip) of forward + backward of one attention layer, batch sharded
  over all chips (heads 16 x 128, bfloat16, causal)."""
  mcfg = lm.get_config('size=olmo_1b').mesh
  mcfg.unlock()
  mcfg.shape = (1, len(devs), 1)
  mesh, rules = sharding.make_mesh(mcfg, devs), sharding.logical_rules(mcfg)
  with sharding.activate(mesh, rules):
    spec = jax.ShapeDtypeStruct((seq_per_chip * len(devs), length, 16, 128), jnp.bfloat16,
                                sharding=sharding.batch_sharding(mesh, rules))

    def loss(q, k, v):
      out = attention.attend(q, k, v, causal=True, implementation=name, block_q=512,
                             block_kv=512, block_rows=64)
      return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  return aot.memory_of(compiled)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--topology', default='v5e:4x4', help="TPU topology ('v5e:4x4') or 'cpu:N'")
  p.add_argument('--lengths', default='2048,4096')
  p.add_argument('--seq_per_chip', type=int, default=4)
  p.add_argument('--layers', type=int, default=16)
  p.add_argument('--variants', default='residual,dhc4,mhc4')
  p.add_argument('--attention_impls', default='xla,chunked,splash',
                 help='attention table; empty: skip it')
  p.add_argument('--step_attention', default='chunked,splash')
  p.add_argument('--policies', default='full,save_streams')
  p.add_argument('--stream_dtypes', default='float32')
  p.add_argument('--out', default='')
  p.add_argument('--markdown', default='')
  p.add_argument('--append', action='store_true',
                 help='add the rows to those already in --out (same topology and batch)')
  args = p.parse_args()
  split = lambda s: [x for x in s.split(',') if x]
  devs = devices(args.topology)
  platform = devs[0].platform
  lengths = [int(x) for x in split(args.lengths)]
  result = {'topology': args.topology, 'device_kind': devs[0].device_kind, 'chips': len(devs),
            'seq_per_chip': args.seq_per_chip, 'layers': args.layers, 'jax': jax.__version__,
            'attention': [], 'step': []}
  if args.append and os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
    result['attention'], result['step'] = previous['attention'], previous['step']

  def save():
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    if args.markdown:
      with open(args.markdown, 'w') as f:
        f.write(markdown(result))

  for name, length in itertools.product(split(args.attention_impls), lengths):
    if platform != 'tpu' and name == 'splash':
      continue
    mem = compile_attention(name, length=length, seq_per_chip=args.seq_per_chip, devs=devs)
    row = dict(attention=name, length=length,
               temp_per_seq=mem['temp_bytes'] / args.seq_per_chip)
    result['attention'].append(row)
    print(json.dumps(row), flush=True)
    save()
  for length, att, policy, stream, variant in itertools.product(
      lengths, split(args.step_attention), split(args.policies), split(args.stream_dtypes),
      split(args.variants)):
    config = step_config(variant, length=length, seq_per_chip=args.seq_per_chip,
                         chips=len(devs), layers=args.layers, attention_name=att,
                         policy=policy, stream_dtype=stream)
    mem, seconds = compile_step(config, devs)
    row = dict(variant=variant, length=length, attention=att, policy=policy,
               stream_dtype=stream, peak=mem['peak_bytes'], temp=mem['temp_bytes'],
               temp_per_seq=mem['temp_bytes'] / args.seq_per_chip,
               arguments=mem['argument_bytes'], compile_s=round(seconds, 1))
    result['step'].append(row)
    print(json.dumps(row), flush=True)
    save()


def markdown(result) -> str:
  """The two tables as markdown."""
  lines = [f"Compiled for {result['topology']} ({result['chips']} x {result['device_kind']}), "
           f"{result['seq_per_chip']} sequences per chip, {result['layers']} layers, "
           f"jax {result['jax']}.", '']
  if result['attention']:
    base = {r['length']: r['temp_per_seq'] for r in result['attention'] if r['attention'] == 'xla'}
    lines += ['| attention | L | temporaries MiB / sequence | xla / this |',
              '|:---|---:|---:|---:|']
    for r in result['attention']:
      ratio = base.get(r['length'], float('nan')) / max(r['temp_per_seq'], 1)
      lines.append(f"| {r['attention']} | {r['length']} | {r['temp_per_seq'] / 2**20:,.1f} | "
                   f'{ratio:.1f} |')
    lines.append('')
  if result['step']:
    res = {(r['length'], r['attention'], r['policy'], r['stream_dtype']): r['peak']
           for r in result['step'] if r['variant'] == 'residual'}
    lines += ['| L | attention | remat | streams | variant | peak GiB / chip | temp GiB / seq '
              '| x residual (peak) | compile s |', '|---:|:---|:---|:---|:---|---:|---:|---:|---:|']
    for r in result['step']:
      ref = res.get((r['length'], r['attention'], r['policy'], r['stream_dtype']))
      ratio = f"{r['peak'] / ref:.3f}" if ref else '-'
      lines.append(f"| {r['length']} | {r['attention']} | {r['policy']} | {r['stream_dtype']} | "
                   f"{LABELS[r['variant']]} | {r['peak'] / GiB:.2f} | "
                   f"{r['temp_per_seq'] / GiB:.2f} | {ratio} | {r['compile_s']} |")
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
