"""The connection library: every residual variant behind one interface, found by name.

`KINDS` maps config.model.connection.kind to its `protocol.Kind` (what a kind module declares:
see protocol.py); `register` adds one (a kind defined outside this package, e.g. in a test).
Per model there is one `Streams` module (from `build_streams`) with two verbs:
  expand(h_BxLxE) -> x_BxLxNxW   (residual: N = 1; hc / mhc / altup: a broadcast to N = n copies;
                                  frac: N = m fractions, W = D/m; vwn: the over-width embedding
                                  E = (n/m) D cut into n segments of D/m)
  reduce(x_BxLxNxW) -> h_BxLxD   (before the final norm)
and per sub-layer (attention, FFN, MoE) one connection module (from `build_connection`):
  connection(x_BxLxNxW, branch) -> x_BxLxNxW
where `branch` maps y_BxLxD -> y_BxLxD. The branch owns its pre-norm (HC paper: T := T o Norm) when
`connection.branch_prenorm` is True; `residual_postnorm` and `resi_dual` set it False and
normalise after the add.

`config` below is config.model.connection: `kind` and one sub-config per registered kind
(config.model.connection.<kind>, its own options; see configs/base.py). Validation
(`validate`) runs once, in models.validate; the builders assume a valid config.
"""

from typing import Callable

import jax
from flax import nnx
import ml_collections

from hyperconn_jax.connections import altup, frac, hc, mhc, protocol, resi_dual, residual, vwn

Branch = Callable[[jax.Array], jax.Array]

KINDS: dict[str, protocol.Kind] = {}


def register(kind: protocol.Kind) -> protocol.Kind:
  """Adds `kind` to KINDS (configs/base.py then gives it a sub-config); returns it."""
  if kind.name in KINDS and KINDS[kind.name] is not kind:
    raise ValueError(f'connection kind {kind.name!r} is already registered')
  if kind.name == 'kind':
    raise ValueError("a connection kind cannot be named 'kind'")
  KINDS[kind.name] = kind
  return kind


for _kind in (residual.PRENORM, residual.POSTNORM, hc.KIND, mhc.KIND, frac.KIND, resi_dual.KIND,
              altup.KIND, vwn.KIND):
  register(_kind)


def defaults() -> ml_collections.ConfigDict:
  """config.model.connection: `kind` and every registered kind's sub-config with its defaults."""
  config = ml_collections.ConfigDict({name: kind.defaults() for name, kind in KINDS.items()})
  config.kind = 'hc'
  return config


def get(config) -> protocol.Kind:
  """The Kind of config.kind; ValueError naming the allowed kinds if it is unknown."""
  if config.kind not in KINDS:
    raise ValueError(f'model.connection.kind must be one of {tuple(KINDS)}, got {config.kind!r}')
  return KINDS[config.kind]


def options(config) -> ml_collections.ConfigDict:
  """The chosen kind's sub-config, config.<kind>."""
  return getattr(config, get(config).name)


def validate(config, d_model: int) -> None:
  """Raises ValueError naming the field, the value and what is allowed, for any bad option."""
  get(config).validate(options(config), d_model)


def layout(config, d_model: int) -> protocol.Layout:
  """Number of streams, width of each and the width of the embedding (see protocol.Layout)."""
  return get(config).layout(options(config), d_model)


def extra_flops(config, d_model: int) -> protocol.ExtraFlops:
  """Forward matmul FLOPs per token the chosen kind adds (see protocol.ExtraFlops)."""
  return get(config).extra_flops(options(config), d_model)


def out_proj_init_multiplier(config) -> float:
  """Factor on the init std of the sub-layers' output projections (hc / mhc: out_proj_sqrt_n)."""
  return get(config).out_proj_multiplier(options(config))


def build_streams(config, *, dim: int, norm_eps: float, rngs: nnx.Rngs) -> nnx.Module:
  """Returns the model-level module with `expand` / `reduce` for config.kind (dim: model width D)."""
  return get(config).Streams(options(config), dim=dim, norm_eps=norm_eps, rngs=rngs)


def build_connection(config, *, dim: int, sublayer_index, norm_kind: str, norm_eps: float,
                     rngs: nnx.Rngs) -> nnx.Module:
  """Returns the connection wrapping one sub-layer.

  Args:
    config: config.model.connection.
    dim: model width D.
    sublayer_index: k, counting sub-layers from 0 (attention of block l is 2l, its FFN 2l + 1);
      may be a traced integer (blocks are created under nnx.vmap).
    norm_kind, norm_eps: the model's norm (used by the post-norm kinds' own norms).
    rngs: random streams for any randomly initialised parameter.
  """
  return get(config).Connection(options(config), dim=dim, sublayer_index=sublayer_index,
                                norm_kind=norm_kind, norm_eps=norm_eps, rngs=rngs)


def connection_types() -> tuple[type, ...]:
  """The Connection classes of every registered kind (the analyses find connections by type)."""
  return tuple(dict.fromkeys(kind.Connection for kind in KINDS.values()))


def streams_types() -> tuple[type, ...]:
  return tuple(dict.fromkeys(kind.Streams for kind in KINDS.values()))


# The fields of the flat config.model.connection written before the per-kind sub-configs, by the
# kinds that read them (a run's config.json from that time is migrated by `migrate`; the flat
# sinkhorn_eps, no longer an option, is dropped).
_FLAT_FIELDS = {
    'hc': ('n', 'dynamic', 'tanh', 'dynamic_norm', 'dynamic_norm_affine', 'scale',
           'alpha_scale_init', 'beta_scale_init', 'train_width', 'train_beta', 'index_base',
           'out_proj_sqrt_n'),
    'mhc': ('n', 'sinkhorn_iters', 'post_mult', 'gate_init', 'res_init',
            'res_offdiag_logit', 'pre_init', 'pre_off_home', 'mappings', 'reduce', 'index_base',
            'out_proj_sqrt_n'),
    'frac': ('m', 'dynamic', 'tanh', 'dynamic_norm', 'dynamic_norm_affine', 'scale',
             'alpha_scale_init', 'beta_scale_init', 'train_width', 'train_beta'),
    'altup': ('n', 'index_base'),
}


def migrate(connection: dict) -> dict:
  """A config.model.connection dict of the flat layout (every option at the top level) in the
  per-kind layout ({'kind', '<kind>': {options}}); any other dict is returned unchanged."""
  if 'kind' not in connection or not any(k in connection for k in ('n', 'm', 'dynamic')):
    return connection
  out = {'kind': connection['kind']}
  for kind, fields in _FLAT_FIELDS.items():
    out[kind] = {f: connection[f] for f in fields if f in connection}
  return out
