"""Records what every connection of a model does on real tokens, in one uniform (per-token) form.

Every connection kind is written as three linear maps per token (the HC matrix of HC App. F):
  extract X [N, r]  the branch input:  h_0 = X^T x            (HC: A_m; mHC: H_pre; frac: Y)
  res     R [N, N]  the residual mix:  x'_j = sum_i R[i, j] x_i  (HC: A_r; mHC: H_res^T; frac: A)
  inject  E [r, N]  the branch output: out = x' + E^T T(h_0)  (HC: B as a row; mHC: H_post; frac:
                    diag(B), since fraction q of T's output goes to fraction-stream q only)
with N streams and r the width of the branch in streams (1, or m for frac and vwn). Each kind
writes its own (its Connection's `hc_form`, its Streams' `ends`: the embedding enters with E_0
[r_0, N] and the output reads X_out [N, r]; hyperconn_jax/connections/protocol.py), so this
module holds no per-kind code.

`trace` runs a model in its Python-loop layout with every connection module temporarily replaced
by a recorder (found by type, recorded in call order), so it works for any model whose blocks
call `connection(x_BxLxNxD, branch)` modules of this library, whatever the model around them.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax import connections
from hyperconn_jax.models import build_model, trunk


def _cosine(a_BxLxD: jax.Array, b_BxLxD: jax.Array) -> jax.Array:
  a, b = a_BxLxD.astype(jnp.float32), b_BxLxD.astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  return num / jnp.maximum(den, 1e-12)


def _set(model, path: tuple, value) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _record(model, inputs: jax.Array) -> dict[str, Any]:
  """Runs `model` (loop layout) on its inputs with recorders in place; see `trace`."""
  conn_types, streams_types = connections.connection_types(), connections.streams_types()
  conns = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, conn_types)]
  streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, streams_types)]
  if not conns or len(streams) != 1:
    raise ValueError(f'{type(model).__name__} has {len(conns)} connection modules and '
                     f'{len(streams)} Streams modules; analyses need at least one connection and '
                     'exactly one Streams module')
  records, last = [], {}  # last['x']: the streams after the last connection (the reduce input).

  def recorder(conn):
    def call(x_BxLxNxD, branch):
      seen = {}

      def spy(h_BxLxD):
        seen['h'] = h_BxLxD
        seen['y'] = branch(h_BxLxD)
        return seen['y']

      out = conn(x_BxLxNxD, spy)
      forms, raw = conn.hc_form(x_BxLxNxD, seen['h'], seen['y'])
      records.append({'forms': forms, 'raw': raw, 'h': seen['h']})
      last['x'] = out
      return out
    return call

  for path, conn in conns:
    _set(model, path, recorder(conn))
  try:
    model(inputs)
  finally:
    for path, conn in conns:
      _set(model, path, conn)
  if len(records) != len(conns):
    raise ValueError(f'{len(conns)} connection modules but {len(records)} calls: analyses need '
                     'each connection called once per forward pass (the loop layout)')
  embed_inject, out_extract = streams[0].ends(last['x'])
  stack = lambda key: jnp.stack([r['forms'][key] for r in records])  # noqa: E731
  cosine = jnp.stack([_cosine(a['h'], b['h']) for a, b in zip(records[:-1], records[1:])]
                     ) if len(records) > 1 else jnp.zeros((0,) + last['x'].shape[:-2])
  return {'extract': stack('extract'), 'res': stack('res'), 'inject': stack('inject'),
          'embed_inject': embed_inject, 'out_extract': out_extract, 'cosine': cosine,
          'raw': [r['raw'] for r in records]}


def loop_layout(model, model_config) -> nnx.Module:
  """`model` itself if config.model.scan_layers is False, else an unplaced copy with its blocks
  in a Python list (parameters copied by models.trunk.copy_weights).

  Args:
    model: the model; model_config: the config.model it was built from.
  """
  if not model_config.scan_layers:
    return model
  loop_config = ml_collections.ConfigDict(model_config.to_dict())
  loop_config.scan_layers = False
  loop = build_model(loop_config, nnx.Rngs(0))
  trunk.copy_weights(model, loop)
  return loop


def trace(model, inputs) -> dict[str, Any]:
  """Runs a loop-layout model on its inputs (tokens [B, L]; a ViT: images) and returns, as
  numpy-convertible jax arrays, with [B, L] the positions of the streams:

    'extract' [K, B, L, N, r], 'res' [K, B, L, N, N], 'inject' [K, B, L, r, N]: the uniform form
      (module docstring) of the K connections in call order (sub-layer 1..K of HC App. F);
    'embed_inject' [B, L, r, N], 'out_extract' [B, L, N, r]: the embedding and output ends;
    'cosine' [K - 1, B, L]: cosine similarity between the branch inputs of consecutive sub-layers
      (HC Fig. 3: the inputs of adjacent layers, before their pre-norm);
    'raw': per connection, its own coefficients ({'alpha', 'beta'} for hc / frac / altup / vwn;
      {'H_pre', 'H_post', 'H_res'} for mhc; {'inv_std'} for Post-Norm and ResiDual; {} for
      Pre-Norm), each [B, L, ...].

  The forward pass is jitted; the model is not modified.
  """
  if getattr(model, 'scan_layers', False):
    raise ValueError('trace needs the loop layout (the scanned blocks run under nnx.scan, where '
                     'nothing can be recorded); convert with trace.loop_layout(model, '
                     'config.model)')
  graphdef, state = nnx.split(model)

  def run(state, inputs):
    return _record(nnx.merge(graphdef, state), inputs)

  return jax.jit(run)(state, jnp.asarray(inputs))

