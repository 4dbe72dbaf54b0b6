"""Accelerator facts per device kind: peak dense bf16 FLOP/s, HBM per chip and HBM bandwidth.

Vendor figures (Cloud TPU system architecture pages; NVIDIA data sheets, SXM parts, dense, no
sparsity). They feed MFU in the step logs (train_lib) and the roofline of the ahead-of-time pod
check (hyperconn_jax.aot). On CPU the peak is a measured fp32 matmul, taken once per process.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                 # short name, as in topology names ('v5p') or the product ('H100')
  peak_flops: float         # dense bf16 FLOP/s per chip
  hbm_bytes: float          # HBM per chip
  hbm_bytes_per_s: float    # HBM bandwidth per chip


_GIB, _GB, _T = 2.0 ** 30, 1e9, 1e12

# Keyed by the topology-name generation (hyperconn_jax.aot) and matched against device_kind by
# DEVICE_KINDS below.
CHIPS = {
    'v4': Chip('v4', 275 * _T, 32 * _GIB, 1200 * _GB),
    'v5e': Chip('v5e', 197 * _T, 16 * _GIB, 819 * _GB),
    'v5p': Chip('v5p', 459 * _T, 95 * _GIB, 2765 * _GB),
    'v6e': Chip('v6e', 918 * _T, 32 * _GIB, 1640 * _GB),
    'A100': Chip('A100', 312 * _T, 80 * _GB, 2039 * _GB),
    'H100': Chip('H100', 989 * _T, 80 * _GB, 3350 * _GB),
    'H200': Chip('H200', 989 * _T, 141 * _GB, 4800 * _GB),
}

# jax's device_kind strings -> CHIPS key. TPU kinds are matched exactly ('TPU v5' is v5p, 'TPU v5
# lite' v5e); GPU kinds by the product name inside them ('NVIDIA H100 80GB HBM3').
_TPU_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
              'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}
_GPU_NAMES = ('A100', 'H100', 'H200')


def chip(device_kind: str) -> Chip | None:
  """The Chip of a jax device_kind, or None for a kind not in the table (e.g. CPU)."""
  if device_kind in _TPU_KINDS:
    return CHIPS[_TPU_KINDS[device_kind]]
  return next((CHIPS[n] for n in _GPU_NAMES if n in device_kind), None)


@functools.cache
def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted fp32 [size, size] x [size, size] product on the default device (best of
  `repeats`); measured once per process."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops_per_second(device: jax.Device) -> float:
  """Peak FLOP/s of one device: the table's for known accelerators, a measured matmul otherwise."""
  known = chip(device.device_kind)
  return known.peak_flops if known is not None else measured_matmul_flops()
