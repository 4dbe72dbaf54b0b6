"""Records what every connection of a model does on real tokens, in one uniform (per-token) form.

Every connection kind is written as three linear maps per token (the HC matrix of HC App. F):
  extract X [N, r]  the branch input:  h_0 = X^T x            (HC: A_m; mHC: H_pre; frac: Y)
  res     R [N, N]  the residual mix:  x'_j = sum_i R[i, j] x_i  (HC: A_r; mHC: H_res^T; frac: A)
  inject  E [r, N]  the branch output: out = x' + E^T T(h_0)  (HC: B as a row; mHC: H_post; frac:
                    diag(B), since fraction q of T's output goes to fraction-stream q only)
with N streams and r = 1 (hc, mhc, altup, resi_dual, residual) or m (frac: the branch sees m
fractions). Residual Pre-Norm is X = R = E = [[1]]; Post-Norm Norm(h + T(h)) is, as HC App. G
writes it, X = [[1]], R = E = [[1 / s]] with s the token's standard deviation (RMS for rmsnorm)
of h + T(h) (centring and any affine scale are folded into the next layer). The embedding enters
with E_0 = 1_{1xN} (a broadcast; frac: I, a split) and the output reads X_out = 1_{Nx1} (a sum;
frac: I, a concatenation; mHC reduce='head': its learned weights). AltUp is HC-form
(alpha = [P^T e_j* | P^T], beta = g). ResiDual's streams (x_a, x_d) are X = [1, 0]^T,
R = diag(1 / s, 1), E = [1 / s, 1] with s as for Post-Norm, and its output x_a + LN(x_d) reads
X_out = [1, 1 / s_d]^T with s_d the std of x_d (the LN's learned scale is left out).

`trace` runs a model in its Python-loop layout with every connection module temporarily replaced
by a recorder (found by type, recorded in call order), so it works for any model whose blocks
call `connection(x_BxLxNxD, branch)` modules of this library, whatever the model around them.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from hyperconn_jax.connections import altup, frac, hc, mhc, resi_dual, residual


def _is_connection(node) -> bool:
  return isinstance(node, (residual.Connection, hc.HyperConnectionBase, mhc.Connection,
                           altup.Connection, resi_dual.Connection))


def _is_streams(node) -> bool:
  return isinstance(node, (residual.Streams, hc.Streams, mhc.Streams, frac.Streams,
                           resi_dual.Streams))


def _inv_std(x_BxLxD: jax.Array, norm) -> jax.Array:
  """1 / (the std (layernorm) or RMS (rmsnorm) of x over D) as `norm` computes it, float32 [B, L]."""
  x_BxLxD = x_BxLxD.astype(jnp.float32)
  if norm.kind == 'layernorm':
    x_BxLxD = x_BxLxD - jnp.mean(x_BxLxD, axis=-1, keepdims=True)
  return jax.lax.rsqrt(jnp.mean(jnp.square(x_BxLxD), axis=-1) + norm.eps)


def _eye(n: int, batch: tuple[int, ...]) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), batch + (n, n))


def _forms(conn, x_BxLxNxD, h_BxLxD, y_BxLxD) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The uniform form {'extract', 'res', 'inject'} ([B, L, ...] float32) and the raw coefficients.

  Args:
    conn: the connection module.
    x_BxLxNxD: its input streams; h_BxLxD / y_BxLxD: its branch input / output.
  """
  batch = x_BxLxNxD.shape[:-2]
  n = x_BxLxNxD.shape[-2]
  if isinstance(conn, residual.Connection):
    if conn.post_norm is None:
      one = jnp.ones(batch + (1, 1), jnp.float32)
      return {'extract': one, 'res': one, 'inject': one}, {}
    inv_s_BxL = _inv_std(h_BxLxD + y_BxLxD, conn.post_norm)
    scale = inv_s_BxL[..., None, None]
    return ({'extract': jnp.ones(batch + (1, 1), jnp.float32), 'res': scale, 'inject': scale},
            {'inv_std': inv_s_BxL})
  if isinstance(conn, resi_dual.Connection):
    # Streams (x_a, x_d): T reads x_a; x_a' = (x_a + y) / s, x_d' = x_d + y.
    inv_s_BxL = _inv_std(h_BxLxD + y_BxLxD, conn.post_norm)
    one, zero = jnp.ones_like(inv_s_BxL), jnp.zeros_like(inv_s_BxL)
    return ({'extract': jnp.stack([one, zero], axis=-1)[..., None],
             'res': jnp.stack([jnp.stack([inv_s_BxL, zero], -1), jnp.stack([zero, one], -1)], -2),
             'inject': jnp.stack([inv_s_BxL, one], axis=-1)[..., None, :]},
            {'inv_std': inv_s_BxL})
  if isinstance(conn, mhc.Connection):
    h_pre, h_post, h_res = (jnp.broadcast_to(c, batch + c.shape[len(c.shape) - k:])
                            for c, k in zip(conn.coefficients(x_BxLxNxD), (1, 1, 2)))
    return ({'extract': h_pre[..., None], 'res': jnp.swapaxes(h_res, -1, -2),
             'inject': h_post[..., None, :]},
            {'H_pre': h_pre, 'H_post': h_post, 'H_res': h_res})
  alpha, beta = conn.coefficients(x_BxLxNxD)
  alpha = jnp.broadcast_to(alpha, batch + alpha.shape[-2:])
  beta = jnp.broadcast_to(beta, batch + beta.shape[-1:])
  raw = {'alpha': alpha, 'beta': beta}
  if isinstance(conn, frac.Connection):
    return ({'extract': alpha[..., :n], 'res': alpha[..., n:],
             'inject': beta[..., None] * _eye(n, batch)}, raw)
  return {'extract': alpha[..., :1], 'res': alpha[..., 1:], 'inject': beta[..., None, :]}, raw


def _stream_ends(streams, x_BxLxNxD) -> tuple[jax.Array, jax.Array]:
  """(E_0 [B, L, r, N] of the embedding, X_out [B, L, N, r] of the final reduction)."""
  batch = x_BxLxNxD.shape[:-2]
  n = x_BxLxNxD.shape[-2]
  if isinstance(streams, frac.Streams):
    return _eye(n, batch), _eye(n, batch)
  ones = jnp.ones(batch + (1, n), jnp.float32)
  if isinstance(streams, mhc.Streams) and streams.head:
    return ones, streams.head_weights(x_BxLxNxD)[..., None]
  if isinstance(streams, resi_dual.Streams):  # x_a + LN(x_d): its learned scale is left out.
    inv_s_BxL = _inv_std(x_BxLxNxD[..., 1, :], streams.dual_norm)
    return ones, jnp.stack([jnp.ones_like(inv_s_BxL), inv_s_BxL], axis=-1)[..., None]
  return ones, jnp.swapaxes(ones, -1, -2)


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
  conns = [(path, node) for path, node in nnx.iter_graph(model) if _is_connection(node)]
  streams = [node for _, node in nnx.iter_graph(model) if _is_streams(node)]
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
      forms, raw = _forms(conn, x_BxLxNxD, seen['h'], seen['y'])
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
  embed_inject, out_extract = _stream_ends(streams[0], last['x'])
  stack = lambda key: jnp.stack([r['forms'][key] for r in records])  # noqa: E731
  cosine = jnp.stack([_cosine(a['h'], b['h']) for a, b in zip(records[:-1], records[1:])]
                     ) if len(records) > 1 else jnp.zeros((0,) + last['x'].shape[:-2])
  return {'extract': stack('extract'), 'res': stack('res'), 'inject': stack('inject'),
          'embed_inject': embed_inject, 'out_extract': out_extract, 'cosine': cosine,
          'raw': [r['raw'] for r in records]}


def loop_layout(model, model_config) -> nnx.Module:
  """`model` itself if config.model.scan_layers is False, else an unplaced copy with its blocks
  in a Python list (parameters copied by models.decoder.copy_weights).

  Args:
    model: the model; model_config: the config.model it was built from.
  """
  if not model_config.scan_layers:
    return model
  from hyperconn_jax.models import build_model, decoder  # pylint: disable=g-import-not-at-top
  loop_config = ml_collections.ConfigDict(model_config.to_dict())
  loop_config.scan_layers = False
  loop = build_model(loop_config, nnx.Rngs(0))
  decoder.copy_weights(model, loop)
  return loop


def trace(model, inputs) -> dict[str, Any]:
  """Runs a loop-layout model on its inputs (tokens [B, L]; a ViT: images) and returns, as
  numpy-convertible jax arrays, with [B, L] the positions of the streams:

    'extract' [K, B, L, N, r], 'res' [K, B, L, N, N], 'inject' [K, B, L, r, N]: the uniform form
      (module docstring) of the K connections in call order (sub-layer 1..K of HC App. F);
    'embed_inject' [B, L, r, N], 'out_extract' [B, L, N, r]: the embedding and output ends;
    'cosine' [K - 1, B, L]: cosine similarity between the branch inputs of consecutive sub-layers
      (HC Fig. 3: the inputs of adjacent layers, before their pre-norm);
    'raw': per connection, its own coefficients ({'alpha', 'beta'} for hc / frac;
      {'H_pre', 'H_post', 'H_res'} for mhc; {'inv_std'} for Post-Norm; {} for Pre-Norm),
      each [B, L, ...].

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

