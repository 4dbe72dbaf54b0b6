"""The connection library: every residual variant behind one interface.

Per model there is one `Streams` module (from `build_streams`) with two verbs:
  expand(h_BxLxD) -> x_BxLxNxD   (residual: N = 1; hc / mhc: a broadcast to N = n copies;
                                  frac: N = m fractions, the last axis D/m)
  reduce(x_BxLxNxD) -> h_BxLxD   (before the final norm; hc: sum; mhc: sum or learned head;
                                  frac: concatenation; resi_dual: x_a + LN(x_d); altup: sum)
and per sub-layer (attention, FFN, MoE) one connection module (from `build_connection`):
  connection(x_BxLxNxD, branch) -> x_BxLxNxD
where `branch` maps y_BxLxD -> y_BxLxD. The branch owns its pre-norm (HC paper: T := T o Norm) when
`connection.branch_prenorm` is True; `residual_postnorm` and `resi_dual` set it False and
normalise after the add. The hc / mhc / frac / altup connections also expose
`coefficients(x_BxLxNxD)`, their float32 mixing coefficients (hc / frac / altup: alpha, beta;
mhc: H_pre, H_post, H_res), for analysis. `resi_dual` (ResiDual) and `altup` (AltUp) are the
related methods of HC Table 4.

`config` below is `config.model.connection` (see configs/base.py for every field).
"""

import math
from typing import Callable

import jax
from flax import nnx

from hyperconn_jax.connections import checks, residual

KINDS = ('residual_prenorm', 'residual_postnorm', 'hc', 'mhc', 'frac', 'resi_dual', 'altup')

Branch = Callable[[jax.Array], jax.Array]


def _module(kind: str):
  if kind in ('residual_prenorm', 'residual_postnorm'):
    return residual
  if kind == 'hc':
    from hyperconn_jax.connections import hc
    return hc
  if kind == 'mhc':
    from hyperconn_jax.connections import mhc
    return mhc
  if kind == 'frac':
    from hyperconn_jax.connections import frac
    return frac
  if kind == 'resi_dual':
    from hyperconn_jax.connections import resi_dual
    return resi_dual
  if kind == 'altup':
    from hyperconn_jax.connections import altup
    return altup
  raise ValueError(f'model.connection.kind must be one of {KINDS}, got {kind!r}')


def validate(config, d_model: int) -> None:
  """Raises ValueError naming the field, the value and what is allowed, for any bad option."""
  module = _module(config.kind)
  checks.common(config)
  module.validate(config, d_model)


def out_proj_init_multiplier(config) -> float:
  """Factor on the init std of the sub-layers' output projections (HC section 4).

  config.out_proj_sqrt_n: 'none' -> 1, 'divide' -> 1/sqrt(N), 'multiply' -> sqrt(N), where N is the
  number of streams n for 'hc' and 'mhc' and 1 for every other kind.
  """
  checks.common(config)
  num_streams = config.n if config.kind in ('hc', 'mhc') else 1
  return {'none': 1.0, 'divide': 1.0 / math.sqrt(num_streams),
          'multiply': math.sqrt(num_streams)}[config.out_proj_sqrt_n]


def build_streams(config, *, dim: int, norm_eps: float, rngs: nnx.Rngs) -> nnx.Module:
  """Returns the model-level module with `expand` / `reduce` for `config.kind`."""
  validate(config, dim)
  return _module(config.kind).Streams(config, dim=dim, norm_eps=norm_eps, rngs=rngs)


def build_connection(config, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
                     rngs: nnx.Rngs) -> nnx.Module:
  """Returns the connection wrapping one sub-layer.

  Args:
    config: config.model.connection.
    dim: model width D.
    sublayer_index: k, counting sub-layers from 0 (attention of block l is 2l, its FFN 2l + 1);
      may be a traced integer (blocks are created under nnx.vmap).
    norm_kind, norm_eps: the model's norm (used by residual_postnorm's own norm).
    rngs: random streams for any randomly initialised parameter.
  """
  validate(config, dim)
  return _module(config.kind).Connection(config, dim=dim, sublayer_index=sublayer_index,
                                         norm_kind=norm_kind, norm_eps=norm_eps, rngs=rngs)
