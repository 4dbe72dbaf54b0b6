"""Ahead-of-time pod check: compiles the real train step for a TPU slice on a machine without one.

  python -m hyperconn_jax.aot --config=configs/paper.py:experiment=dhc4,size=paper \
      --topology=v5p:4x4x4 --json=runs/aot/dhc4_v5p.json

Needs libtpu (`pip install 'jax[tpu]==0.10.2'`), no TPU: the slice's devices come from
jax.experimental.topologies, the mesh and shardings from the config exactly as in training
(train_lib.make_setup / make_train_step), the state and batch are abstract (nothing is allocated).
Prints, per chip: the memory of the compiled step (arguments, outputs, temporaries, donated aliases)
against the chip's HBM; FLOPs per step from XLA's cost analysis and from the model-FLOPs formula
(hyperconn_jax.flops); and a roofline step time, max(FLOPs / peak, bytes accessed / HBM
bandwidth), which ignores communication and overlap, so it is a lower bound.
"""

import json
import math
import os
import re
import time
from typing import Any

from absl import app
from absl import flags
from etils import epath
import jax
from jax.experimental import topologies
from ml_collections import config_flags

from hyperconn_jax import cli
from hyperconn_jax import config_lib
from hyperconn_jax import connections
from hyperconn_jax import devices as devices_lib
from hyperconn_jax import flops as flops_lib
from hyperconn_jax import sharding
from hyperconn_jax import train_lib

# Topology names libtpu accepts: generation:AxB (v5e, v6e) or generation:AxBxC (v4, v5p), in chips.
_TOPOLOGY = re.compile(r'^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$')
_GENERATION_DIMS = {'v4': 3, 'v5p': 3, 'v5e': 2, 'v6e': 2}


class OutOfMemoryError(RuntimeError):
  """XLA refused to compile the step: it does not fit in the chip's HBM."""


def parse_topology(name: str) -> tuple[devices_lib.Chip, int]:
  """(chip, number of chips) of a topology name like 'v5p:4x4x4' or 'v5e:16x16'.

  Raises ValueError naming the value and the allowed forms.
  """
  match = _TOPOLOGY.match(name)
  allowed = ("generation:AxB for v5e / v6e (e.g. 'v5e:16x16') or generation:AxBxC for v4 / v5p "
             "(e.g. 'v5p:4x4x4'), sizes in chips")
  if match is None:
    raise ValueError(f'--topology={name!r} is invalid: must be {allowed}')
  generation, *dims = match.groups()
  dims = [int(d) for d in dims if d is not None]
  if len(dims) != _GENERATION_DIMS[generation] or min(dims) < 1:
    raise ValueError(f'--topology={name!r} is invalid: {generation} takes '
                     f'{_GENERATION_DIMS[generation]} sizes; must be {allowed}')
  return devices_lib.CHIPS[generation], math.prod(dims)


def topology_devices(name: str) -> list[jax.Device]:
  """The devices of a TPU slice (compile-only: nothing can run on them)."""
  parse_topology(name)
  # Compile only: libtpu need not ask the GCE metadata server for the slice (it is named here), and
  # may load next to another process holding libtpu (a training run on this TPU VM, a second check).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=name)
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError.
    if 'tpu' in str(e).lower() and ('unknown backend' in str(e).lower()
                                    or 'not found' in str(e).lower()):
      raise RuntimeError("compiling for a TPU slice needs libtpu: pip install 'jax[tpu]==0.10.2' "
                         f'-c constraints.txt ({e})') from e
    raise ValueError(f'--topology={name!r} is rejected by libtpu: {e}') from e
  return list(topology.devices)


def memory_of(compiled) -> dict[str, int]:
  """Bytes per device of a compiled step: arguments, outputs, temporaries, donated aliases and the
  peak (arguments + outputs + temporaries - aliases)."""
  ma = compiled.memory_analysis()
  out = {'argument_bytes': int(ma.argument_size_in_bytes),
         'output_bytes': int(ma.output_size_in_bytes),
         'temp_bytes': int(ma.temp_size_in_bytes),
         'alias_bytes': int(ma.alias_size_in_bytes)}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                       - out['alias_bytes'])
  return out


def compile_train_step(config, devices: list[jax.Device]):
  """(compiled train step, train_lib.Setup) for `devices`, built exactly as train_lib builds it."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    step = train_lib.make_train_step(config, setup)
    lowered = step.lower(train_lib.abstract_train_state(setup),
                         train_lib.abstract_batch(config, setup))
    try:
      return lowered.compile(), setup
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' in str(e):
        raise OutOfMemoryError(f'the train step does not fit on {devices[0].device_kind}: '
                               f'{str(e).splitlines()[0]}') from e
      raise


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # One entry per program.
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0))}


def step_cost(config, devices: list[jax.Device]) -> dict[str, float]:
  """FLOPs and bytes accessed per device of one train step, as XLA's cost analysis counts them.

  XLA counts the body of a loop once, not once per iteration, so the scanned layers and the
  microbatch loop are undercounted in the real step. This compiles the step unrolled instead
  (model.scan_layers=False, one microbatch of the real size) with 1 and with 2 layers, and
  extrapolates linearly to model.num_layers layers and optim.grad_accum_steps microbatches (the
  optimizer update is then counted once per microbatch: a small overcount).
  """
  accum = config.optim.grad_accum_steps
  costs = []
  for layers in (1, 2):
    probe = config.copy_and_resolve_references()
    probe.model.num_layers = layers
    probe.model.scan_layers = False
    probe.train.batch_size = config.train.batch_size // accum
    probe.optim.grad_accum_steps = 1
    costs.append(_cost(compile_train_step(probe, devices)[0]))
  return {k: accum * (costs[0][k] + (config.model.num_layers - 1) * (costs[1][k] - costs[0][k]))
          for k in costs[0]}


def analyze(config, topology: str, *, roofline: bool = True) -> dict[str, Any]:
  """Compiles config's train step for the TPU slice `topology` and returns its figures per chip.

  roofline=False skips the two extra compiles of step_cost: memory and model FLOPs only.

  Bad input (topology name, a mesh that does not divide the chips, a batch that does not divide
  over the batch mesh axes, any invalid model / optimiser / training field) raises ValueError
  before anything is compiled.
  """
  chip, num_chips = parse_topology(topology)
  config_lib.validate_step(config)
  config_lib.validate_mesh_for_devices(config, num_chips)
  devices = topology_devices(topology)
  if len(devices) != num_chips:
    raise ValueError(f'--topology={topology!r}: libtpu gives {len(devices)} devices for '
                     f'{num_chips} chips; this check assumes one device per chip')
  start = time.perf_counter()
  compiled, setup = compile_train_step(config, devices)
  compile_s = time.perf_counter() - start
  memory = memory_of(compiled)
  model_flops = flops_lib.model_flops_per_step(config)
  model_flops_per_chip = model_flops / num_chips
  mesh = setup.mesh
  micro = config.train.batch_size // config.optim.grad_accum_steps
  batch_axes = setup.batch_sharding.spec[0] or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
  result = {
      'topology': topology, 'chip': chip.name, 'num_chips': num_chips,
      'device_kind': devices[0].device_kind,
      'mesh': dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
      'connection': config.model.connection.kind, 'rate': connections.layout(
          config.model.connection, config.model.d_model).num_streams,
      'd_model': config.model.d_model, 'num_layers': config.model.num_layers,
      'seq_len': config.data.seq_len, 'global_batch': config.train.batch_size,
      'tokens_per_step': config.train.batch_size * config.data.seq_len,
      'grad_accum_steps': config.optim.grad_accum_steps,
      'per_chip_microbatch': micro / batch_shards,
      'remat_policy': config.model.remat_policy, 'dtype': config.model.dtype,
      **memory,
      'hbm_bytes': chip.hbm_bytes, 'hbm_fraction': memory['peak_bytes'] / chip.hbm_bytes,
      'fits': memory['peak_bytes'] <= chip.hbm_bytes,
      'model_flops_per_step': model_flops, 'model_flops_per_chip': model_flops_per_chip,
      'peak_flops_per_chip': chip.peak_flops, 'hbm_bytes_per_s': chip.hbm_bytes_per_s,
      'compile_s': compile_s,
  }
  if roofline:
    cost = step_cost(config, devices)
    compute_s = cost['flops'] / chip.peak_flops
    memory_s = cost['bytes_accessed'] / chip.hbm_bytes_per_s
    result.update({
        'xla_flops_per_chip': cost['flops'], 'bytes_accessed_per_chip': cost['bytes_accessed'],
        'roofline_compute_s': compute_s, 'roofline_memory_s': memory_s,
        'roofline_step_s': max(compute_s, memory_s),
        'roofline_mfu': model_flops_per_chip / chip.peak_flops / max(compute_s, memory_s)})
  return result


def report(r: dict[str, Any]) -> str:
  """The figures of `analyze` as readable lines."""
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  mesh = ' x '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [
      f"{r['topology']} ({r['num_chips']} x {r['device_kind']}), mesh {mesh}",
      f"model: {r['connection']} x{r['rate']}, d={r['d_model']}, {r['num_layers']} layers, "
      f"{r['dtype']}, remat {r['remat_policy']!r}; batch {r['global_batch']} x {r['seq_len']} "
      f"tokens, {r['grad_accum_steps']} microbatches of {r['per_chip_microbatch']:g} per chip",
      f"memory per chip: arguments {gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])}, "
      f"temporaries {gib(r['temp_bytes'])}, aliased {gib(r['alias_bytes'])}; "
      f"total {gib(r['peak_bytes'])} of {gib(r['hbm_bytes'])} HBM ({r['hbm_fraction']:.0%}"
      f"{'' if r['fits'] else ', DOES NOT FIT'})",
      f"FLOPs per step: {r['model_flops_per_step']:.4g} (model formula; "
      f"{r['model_flops_per_chip']:.4g} per chip)"]
  if 'roofline_step_s' in r:
    lines += [
        f"FLOPs per chip counted by XLA: {r['xla_flops_per_chip']:.4g}",
        f"roofline per step: compute {r['roofline_compute_s'] * 1e3:.1f} ms, HBM "
        f"{r['roofline_memory_s'] * 1e3:.1f} ms ({r['bytes_accessed_per_chip'] / 2**30:.1f} GiB)"
        f" -> {r['roofline_step_s'] * 1e3:.1f} ms (communication not included), model-FLOPs "
        f"utilisation at that time {r['roofline_mfu']:.0%}"]
  lines.append(f"compiled in {r['compile_s']:.1f} s")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _TOPOLOGY_FLAG.value:
    raise app.UsageError('--config and --topology are required')
  with cli.usage_errors():  # A bad topology, mesh or batch: one line, exit 2.
    result = analyze(_CONFIG.value, _TOPOLOGY_FLAG.value)
  print(report(result), flush=True)
  if _JSON.value:
    path = epath.Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  # Defined here, not at import: library users (benchmarks/) must not get these absl flags.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', default=None,
      help_string='Config file (path.py or path.py:ARGS); override fields with --config.a.b=v.',
      lock_config=True)
  _TOPOLOGY_FLAG = flags.DEFINE_string(
      'topology', None, "TPU slice, e.g. 'v5p:4x4x4' (64 chips) or 'v5e:16x16' (256 chips).")
  _JSON = flags.DEFINE_string('json', '', 'Write the figures to this JSON file as well.')
  cli.run(main)
