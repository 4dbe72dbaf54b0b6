"""The paper's analyses, in numpy, on the uniform per-token form that `trace.trace` records.

Tokens are the flattened [B, L] positions with a positive weight (padding excluded); every function
takes arrays whose leading token axis is T (after `select_tokens`).

  connection_matrices  HC App. F: unrolled C^(0) and per-stream C^(i), averaged over tokens
  collapse             HC Fig. 3: cosine similarity of adjacent sub-layers' inputs (median, 5-95%)
  gain                 mHC Figs. 3 / 7: Amax gain of single and composite residual mixing
  coefficient_stats    distributions of each connection's own coefficients (alpha, beta, H_*)
"""

from typing import Any

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)


def select_tokens(traced: dict[str, Any], weights_BxL: np.ndarray | None = None
                  ) -> dict[str, Any]:
  """Moves the [B, L] axes of every traced array to one token axis (first), keeping the tokens
  with a positive weight: weights [B, L] per token (LM), [B] per example (a classifier: every
  patch of a weighted image), or None (all).

  Returns the same keys: 'extract' [T, K, N, r], 'res' [T, K, N, N], 'inject' [T, K, r, N],
  'embed_inject' [T, r, N], 'out_extract' [T, N, r], 'cosine' [T, K - 1] and 'raw' (a list over
  the K connections of {name: [T, ...]}).
  """
  shape_BxL = np.shape(traced['embed_inject'])[:2]
  weights = np.ones(shape_BxL) if weights_BxL is None else np.asarray(weights_BxL)
  if weights.ndim == 1:
    weights = np.broadcast_to(weights[:, None], shape_BxL)
  keep = weights.reshape(-1) > 0

  def tokens_first(a, layer_axis):
    a = np.asarray(a, np.float64)
    if layer_axis:
      a = np.moveaxis(a, 0, 2)  # [K, B, L, ...] -> [B, L, K, ...]
    return a.reshape((-1,) + a.shape[2:])[keep]

  out = {key: tokens_first(traced[key], True) for key in ('extract', 'res', 'inject', 'cosine')}
  out.update({key: tokens_first(traced[key], False) for key in ('embed_inject', 'out_extract')})
  out['raw'] = [{name: tokens_first(value, False) for name, value in raw.items()}
                for raw in traced['raw']]
  return out


def concat_tokens(parts: list[dict[str, Any]]) -> dict[str, Any]:
  """Joins several `select_tokens` results (batches) along the token axis."""
  out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != 'raw'}
  out['raw'] = [{name: np.concatenate([p['raw'][k][name] for p in parts]) for name in raw}
                for k, raw in enumerate(parts[0]['raw'])]
  return out


def _aligned(m_TxRxS: np.ndarray, column: int | None = None) -> np.ndarray:
  """A scalar per token from a transfer matrix: the mean of its diagonal (r = 1: its entry).

  With `column`, m is [T, r, 1] (a transfer into stream `column`): its entry on row
  column mod r (frac: the fraction that lands in its own stream; hc / mhc: the only row).
  """
  if column is not None:
    return m_TxRxS[:, column % m_TxRxS.shape[1], 0]
  return np.trace(m_TxRxS, axis1=-2, axis2=-1) / m_TxRxS.shape[-1]


def connection_matrices(tokens: dict[str, Any]) -> dict[str, np.ndarray]:
  """The unrolled connection matrices of HC App. F (Eqs. 20, 27-29), averaged over tokens.

  Layers are 0 (the embedding, T^0 = identity), 1..K (the sub-layers in call order) and K + 1
  (the summed output). Entry [k - 1, j] (k = 1..K+1, j = 0..K, j < k) is
    c_kj^(0) = E^j (R^{j+1} ... R^{k-1}) X^k      (HC: B^j (prod A_r^t) A_m^k),
  the weight with which layer j's output reaches layer k's input; c^(i) replaces X^k with
  column i of R^k (stream i of the residual layer k reads; R^{K+1} = I). Entries with j >= k are 0.
  With r > 1 (frac) the scalar is the mean over the r aligned fractions.

  Returns:
    {'C0': [K + 1, K + 1], 'C_streams': [N, K + 1, K + 1]} (float64).
  """
  extract, res, inject = tokens['extract'], tokens['res'], tokens['inject']
  t, k_layers, n = res.shape[0], res.shape[1], res.shape[2]
  # Index 0 is the embedding and K + 1 the output; connection k (0-based) is layer k + 1.
  injects = [tokens['embed_inject']] + [inject[:, k] for k in range(k_layers)]
  extracts = [None] + [extract[:, k] for k in range(k_layers)] + [tokens['out_extract']]
  eye = np.broadcast_to(np.eye(n), (t, n, n))
  residuals = [None] + [res[:, k] for k in range(k_layers)] + [eye]
  size = k_layers + 1
  c0 = np.zeros((size, size))
  cs = np.zeros((n, size, size))
  for k in range(1, k_layers + 2):
    v0 = extracts[k]                    # [T, N, r]: what layer k reads, as a map of the streams.
    vs = residuals[k][..., None]        # [T, N, N, 1]: stream i of layer k's residual.
    for j in range(k - 1, -1, -1):
      c0[k - 1, j] = np.mean(_aligned(injects[j] @ v0))
      for i in range(n):
        cs[i, k - 1, j] = np.mean(_aligned(injects[j] @ vs[:, :, i], column=i))
      if j > 0:  # Carry the reading back through R^j (the residual of layer j).
        v0 = residuals[j] @ v0
        vs = np.einsum('tab,tbcx->tacx', residuals[j], vs)
  return {'C0': c0, 'C_streams': cs}


def collapse(tokens: dict[str, Any]) -> dict[str, list[float]]:
  """Cosine similarity between the inputs of adjacent sub-layers (HC Fig. 3), over tokens.

  Returns {'layer': [2..K] (the later sub-layer of each pair), 'median', 'p05', 'p95', 'mean'}.
  """
  cos_TxK = tokens['cosine']
  return {
      'layer': list(range(2, cos_TxK.shape[1] + 2)),
      'median': np.median(cos_TxK, axis=0).tolist(),
      'p05': np.percentile(cos_TxK, 5, axis=0).tolist(),
      'p95': np.percentile(cos_TxK, 95, axis=0).tolist(),
      'mean': np.mean(cos_TxK, axis=0).tolist(),
  }


def amax_gain(m_TxNxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per token: (forward, backward) Amax gain of mixing matrices in the mHC orientation
  (x_out = M x_in): the largest |row sum| and the largest |column sum|."""
  return (np.max(np.abs(np.sum(m_TxNxN, axis=-1)), axis=-1),
          np.max(np.abs(np.sum(m_TxNxN, axis=-2)), axis=-1))


def gain(tokens: dict[str, Any]) -> dict[str, list[float]]:
  """Amax gain magnitude (mHC section 3.1, Figs. 3 and 7), averaged over tokens.

  The residual mixing of sub-layer l in the mHC orientation is M_l = R_l^T (H_res for mHC, A_r^T
  for HC, 1 for a residual); the composite of sub-layers 1..l is M_l ... M_1.

  Returns {'layer': [1..K], 'forward' / 'backward': the single sub-layer's gain,
  'composite_forward' / 'composite_backward': the composite's}.
  """
  res = tokens['res']
  t, k_layers, n = res.shape[:3]
  composite = np.broadcast_to(np.eye(n), (t, n, n))
  out = {'layer': list(range(1, k_layers + 1)), 'forward': [], 'backward': [],
         'composite_forward': [], 'composite_backward': []}
  for k in range(k_layers):
    m = np.swapaxes(res[:, k], -1, -2)
    composite = m @ composite
    for prefix, matrix in (('', m), ('composite_', composite)):
      fwd, bwd = amax_gain(matrix)
      out[prefix + 'forward'].append(float(np.mean(fwd)))
      out[prefix + 'backward'].append(float(np.mean(bwd)))
  return out


def coefficient_stats(tokens: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
  """Per connection (sub-layer 1..K) and coefficient name, per entry over tokens: mean, std and
  the PERCENTILES (lists shaped like the coefficient, e.g. alpha [N, M])."""
  stats = []
  for raw in tokens['raw']:
    layer = {}
    for name, value_T in raw.items():
      layer[name] = {'shape': list(value_T.shape[1:]),
                     'mean': np.mean(value_T, axis=0).tolist(),
                     'std': np.std(value_T, axis=0).tolist(),
                     **{f'p{q:02d}': np.percentile(value_T, q, axis=0).tolist()
                        for q in PERCENTILES}}
    stats.append(layer)
  return stats
