"""The connection protocol: what one connection kind declares about itself (`Kind`).

A kind is one module that builds a `Kind` and is registered by name (`connections.register`).
Nothing outside that module branches on the kind: the models, the analyses (analysis/trace.py),
the FLOPs count (flops.py), the benchmarks and the configs read it through this protocol.

`cfg` below is the kind's own sub-config, config.model.connection.<name>, holding only the options
that mean something to the kind (its `defaults()`).

A Kind provides:
  name          the value of config.model.connection.kind
  defaults()    its options with their defaults (an ml_collections.ConfigDict; may be empty)
  validate(cfg, d_model)   raises ValueError naming model.connection.<name>.<field>, the value and
                what is allowed (`checks`); runs once, in models.validate, before compilation
  layout(cfg, d_model) -> Layout   number of streams, width of each, width of the embedding
  Streams(cfg, *, dim, norm_eps, rngs)   the model-level module (dim: the model width D):
                expand(h_BxLxE) -> x_BxLxNxW, reduce(x_BxLxNxW) -> h_BxLxD, and
                ends(x_BxLxNxW) -> (E_0 [B, L, r, N], X_out [B, L, N, r]) for the analyses
  Connection(cfg, *, dim, sublayer_index, norm_kind, norm_eps, rngs)   one per sub-layer:
                __call__(x_BxLxNxW, branch) -> x_BxLxNxW, `branch_prenorm` (does the branch apply
                the model's pre-norm), and hc_form(x_BxLxNxW, h_BxLxD, y_BxLxD) -> (form, raw):
                form = {'extract' [B, L, N, r], 'res' [B, L, N, N], 'inject' [B, L, r, N]}, its HC
                matrix per token (analysis/trace.py), raw = its own float32 coefficients
  extra_flops(cfg, d_model) -> ExtraFlops   forward matmul FLOPs per token that the kind adds
  out_proj_multiplier(cfg) -> float   factor on the init std of the sub-layers' output projections
"""

import dataclasses
from typing import Callable, NamedTuple

import ml_collections


class Layout(NamedTuple):
  """How a kind lays out the residual state of a model of width d_model.

  num_streams: N, the stream axis of x_BxLxNxW.
  stream_width: W, the width of one stream (d_model for copies, d_model / m for fractions).
  embed_width: E, the width of the embedding that `Streams.expand` takes (d_model, except for
    kinds that widen the embedding, as Virtual Width Networks do).
  """
  num_streams: int
  stream_width: int
  embed_width: int


class ExtraFlops(NamedTuple):
  """Forward matmul FLOPs per token that a kind adds to the residual model.

  per_sublayer: around each attention / FFN sub-layer (width, depth and dynamic projections).
  per_token: once per token, at the ends (expand / reduce).
  """
  per_sublayer: float
  per_token: float = 0.0


NO_FLOPS = ExtraFlops(0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Kind:
  """One connection kind; see the module docstring for each field."""
  name: str
  defaults: Callable[[], ml_collections.ConfigDict]
  validate: Callable[[ml_collections.ConfigDict, int], None]
  layout: Callable[[ml_collections.ConfigDict, int], Layout]
  Streams: type
  Connection: type
  extra_flops: Callable[[ml_collections.ConfigDict, int], ExtraFlops] = lambda cfg, d: NO_FLOPS
  out_proj_multiplier: Callable[[ml_collections.ConfigDict], float] = lambda cfg: 1.0


def no_options() -> ml_collections.ConfigDict:
  """`defaults` of a kind without options."""
  return ml_collections.ConfigDict()


def no_validation(cfg, d_model: int) -> None:
  """`validate` of a kind without options."""
  del cfg, d_model


def single_stream(cfg, d_model: int) -> Layout:
  """`layout` of a kind with one stream of the model's width."""
  del cfg
  return Layout(1, d_model, d_model)
