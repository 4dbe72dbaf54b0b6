"""Scaled dot-product attention, one function per implementation (config.model.attention).

  q_BxLxHxK, k_BxLxHxK, v_BxLxHxK -> out_BxLxHxK   (softmax(q k^T / sqrt(K)) v, causal or not)

- 'xla': the dense reference: float32 [B, H, L, L] scores and softmax.
- 'rows': dense attention in blocks of `block_rows` query rows, each block over only the keys it
  can see (causal: its prefix), so the fully masked tiles above the diagonal are never computed:
  (1 + 1 / blocks) / 2 of the dense work and score memory; backward by autodiff (probabilities
  saved). Exact like 'xla'; with 64-row blocks 1.4-2x faster than 'xla' or a single-tile
  'chunked' on CPU at L = 256-512 (docs/performance.md).
- 'chunked': blockwise attention with an online softmax in plain JAX (any backend). A custom VJP
  recomputes the scores block by block in the backward pass (flash-attention style), so forward
  and backward keep only [B, H, block_q, block_kv] scores alive and memory grows linearly in L.
  Block sizes need not divide L (q, k, v are padded and the padding is masked).
- 'cudnn': `jax.nn.dot_product_attention(..., implementation='cudnn')` (NVIDIA GPUs, bfloat16).
- 'splash': the Pallas TPU splash-attention kernels, under `jax.shard_map` over the mesh set with
  `jax.set_mesh` (batch and heads sharded as the logical rules 'batch' and 'heads' say).
- 'auto': splash on TPU (chunked when L is not a multiple of 128, e.g. a ViT's 197 positions),
  cudnn on GPU (bfloat16 compute), on CPU rows where chunked would run a single tile anyway
  (L <= block_q and L <= block_kv: its [B, H, L, L] scores exist either way), chunked otherwise.

The platform is the one of the mesh set with `jax.set_mesh` (so a model compiled ahead of time for
a TPU topology on a CPU host picks the TPU kernels), else `jax.default_backend()`. A named
implementation that cannot run there raises ValueError while tracing, before any compilation.
RoPE and QK-norm are applied by the caller (models/layers.py), so they work with all of them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from hyperconn_jax import sharding

IMPLEMENTATIONS = ('auto', 'xla', 'rows', 'chunked', 'cudnn', 'splash')
# Platforms each named implementation runs on.
PLATFORMS = {'xla': ('cpu', 'gpu', 'tpu'), 'rows': ('cpu', 'gpu', 'tpu'),
             'chunked': ('cpu', 'gpu', 'tpu'), 'cudnn': ('gpu',), 'splash': ('tpu',)}
# Splash kernels tile the sequence in blocks of this many positions (TPU lane width multiples).
SPLASH_BLOCK = 512
SPLASH_MIN_BLOCK = 128


def platform() -> str:
  """'cpu' | 'gpu' | 'tpu': the platform of the mesh set with jax.set_mesh, else the default."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  name = device.platform if device is not None else jax.default_backend()
  return 'gpu' if name in ('cuda', 'rocm') else name


def resolve(name: str, dtype, length: int, on: str | None = None,
            chunk: int | None = None) -> str:
  """The implementation `name` stands for with compute `dtype` and sequence `length` on
  platform `on` (default: `platform()`); `chunk`: 'chunked''s smaller block (min(block_q,
  block_kv)), up to which 'auto' picks 'rows' on CPU (None: never).

  Raises ValueError naming model.attention when `name` is unknown or cannot run there.
  """
  on = platform() if on is None else on
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {IMPLEMENTATIONS}, got {name!r}')
  if name == 'auto':
    if on == 'tpu':
      return 'splash' if length % SPLASH_MIN_BLOCK == 0 else 'chunked'
    if on == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return 'cudnn'
    return 'rows' if on == 'cpu' and chunk is not None and length <= chunk else 'chunked'
  if on not in PLATFORMS[name]:
    runnable = tuple(n for n in IMPLEMENTATIONS if n == 'auto' or on in PLATFORMS[n])
    raise ValueError(f'model.attention={name!r} needs a {" or ".join(PLATFORMS[name]).upper()} '
                     f'backend, but this one is {on.upper()}; allowed here: {runnable}')
  if name == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16', got "
                     f'{jnp.dtype(dtype).name!r}')
  return name


def attend(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, *, causal: bool,
           implementation: str, block_q: int, block_kv: int, block_rows: int) -> jax.Array:
  """Attention of q over k, v ([B, L, H, K], one dtype) with `implementation` (resolved here).

  block_q, block_kv: 'chunked' tile sizes (model.attention_block_q / _kv); block_rows: 'rows''s
  query block (model.attention_block_rows). Returns [B, L, H, K] in q's dtype.
  """
  name = resolve(implementation, q_BxLxHxK.dtype, q_BxLxHxK.shape[1],
                 chunk=min(block_q, block_kv))
  if name == 'xla':
    return xla(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal=causal)
  if name == 'rows':
    return rows(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal=causal, block_rows=block_rows)
  if name == 'chunked':
    return chunked(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal=causal, block_q=block_q,
                   block_kv=block_kv)
  if name == 'cudnn':
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=causal,
                                        implementation='cudnn')
  return splash(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal=causal)


# ----------------------------------------------------------------------------- xla (dense)


def xla(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *, causal: bool) -> jax.Array:
  """The dense reference: float32 scores and softmax, probabilities cast to q's dtype."""
  length, head_dim = q_BxLxHxK.shape[1], q_BxLxHxK.shape[-1]
  scores_BxHxLxL = jnp.einsum('bqhk,bthk->bhqt', q_BxLxHxK, k_BxLxHxK,
                              preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
  if causal:
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores_BxHxLxL = jnp.where(causal_LxL, scores_BxHxLxL, jnp.finfo(jnp.float32).min)
  probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(q_BxLxHxK.dtype)
  return jnp.einsum('bhqt,bthk->bqhk', probs_BxHxLxL, v_BxLxHxK)


# ----------------------------------------------------------------------------- rows


def rows(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *, causal: bool, block_rows: int) -> jax.Array:
  """Dense attention by blocks of `block_rows` query rows (the last may be shorter), each over
  the keys it can see (see the module docstring); the same values as 'xla'."""
  _check_block('attention_block_rows', block_rows)
  length, head_dim = q_BxLxHxK.shape[1], q_BxLxHxK.shape[-1]
  if not causal:
    block_rows = length  # Every row sees every key: one tile.
  # Heads-major once, so each tile's batched matmuls need no transposes of their own.
  q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (
      jnp.swapaxes(x, 1, 2) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  out = []
  for start in range(0, length, block_rows):
    stop = min(start + block_rows, length)
    seen = stop if causal else length
    s_BxHxQxT = jnp.einsum('bhqk,bhtk->bhqt', q_BxHxLxK[:, :, start:stop], k_BxHxLxK[:, :, :seen],
                           preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
    if causal:  # Trace-time mask: key t is visible to query start + i when t <= start + i.
      visible_QxT = np.arange(seen)[None, :] <= np.arange(start, stop)[:, None]
      s_BxHxQxT = jnp.where(visible_QxT, s_BxHxQxT, jnp.finfo(jnp.float32).min)
    p_BxHxQxT = jax.nn.softmax(s_BxHxQxT, axis=-1).astype(q_BxLxHxK.dtype)
    out.append(jnp.einsum('bhqt,bhtk->bhqk', p_BxHxQxT, v_BxHxLxK[:, :, :seen]))
  return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2)


# ----------------------------------------------------------------------------- chunked


def chunked(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *, causal: bool, block_q: int,
            block_kv: int) -> jax.Array:
  """Blockwise attention with an online softmax and a recomputing custom VJP (see the module
  docstring). Blocks larger than L are shrunk to L; L is padded up to a multiple of each block."""
  for field, block in (('attention_block_q', block_q), ('attention_block_kv', block_kv)):
    _check_block(field, block)
  length = q_BxLxHxK.shape[1]
  block_q, block_kv = min(block_q, length), min(block_kv, length)
  return _chunked(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal, block_q, block_kv)


def _check_block(field: str, block) -> None:
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ValueError(f'model.{field} must be a positive integer, got {block!r}')


def _pad_to(x_BxLxHxK: jax.Array, length: int) -> jax.Array:
  pad = length - x_BxLxHxK.shape[1]
  return x_BxLxHxK if pad == 0 else jnp.pad(x_BxLxHxK, ((0, 0), (0, pad), (0, 0), (0, 0)))


def _blocks(length: int, block_q: int, block_kv: int):
  """(number of q blocks, number of kv blocks, padded q length, padded kv length)."""
  num_q, num_kv = -(-length // block_q), -(-length // block_kv)
  return num_q, num_kv, num_q * block_q, num_kv * block_kv


def _kv_blocks_needed(i, causal: bool, block_q: int, block_kv: int, num_kv: int):
  """Number of kv blocks q block i attends to (all, or those that start before its end)."""
  if not causal:
    return num_kv
  return jnp.minimum(((i + 1) * block_q + block_kv - 1) // block_kv, num_kv)


def _masked_scores(q_BxQxHxK, k_BxTxHxK, q_start, kv_start, *, causal: bool, length: int,
                   scale: float):
  """float32 scaled scores [B, H, Q, T] of one tile and its mask [Q, T] (causal, padding)."""
  s_BxHxQxT = jnp.einsum('bqhk,bthk->bhqt', q_BxQxHxK, k_BxTxHxK,
                         preferred_element_type=jnp.float32) * scale
  q_pos_Q = q_start + jnp.arange(q_BxQxHxK.shape[1])
  kv_pos_T = kv_start + jnp.arange(k_BxTxHxK.shape[1])
  mask_QxT = (kv_pos_T < length)[None, :]
  if causal:
    mask_QxT = mask_QxT & (kv_pos_T[None, :] <= q_pos_Q[:, None])
  return s_BxHxQxT, mask_QxT


def _chunked_forward(q, k, v, causal, block_q, block_kv):
  """(out [B, L, H, K] in q's dtype, float32 log-sum-exp [B, H, L_padded])."""
  b, length, h, kdim = q.shape
  num_q, num_kv, len_q, len_kv = _blocks(length, block_q, block_kv)
  scale = 1.0 / math.sqrt(kdim)
  q_p, k_p, v_p = _pad_to(q, len_q), _pad_to(k, len_kv), _pad_to(v, len_kv)

  def q_block(i):
    q_BxQxHxK = jax.lax.dynamic_slice_in_dim(q_p, i * block_q, block_q, axis=1)

    def kv_step(j, carry):
      acc_BxHxQxK, m_BxHxQ, l_BxHxQ = carry
      k_BxTxHxK = jax.lax.dynamic_slice_in_dim(k_p, j * block_kv, block_kv, axis=1)
      v_BxTxHxK = jax.lax.dynamic_slice_in_dim(v_p, j * block_kv, block_kv, axis=1)
      s, mask_QxT = _masked_scores(q_BxQxHxK, k_BxTxHxK, i * block_q, j * block_kv,
                                   causal=causal, length=length, scale=scale)
      m_new = jnp.maximum(m_BxHxQ, jnp.max(jnp.where(mask_QxT, s, -jnp.inf), axis=-1))
      # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p_BxHxQxT = jnp.where(mask_QxT, jnp.exp(s - m_safe[..., None]), 0.0)
      correction = jnp.exp(jnp.where(jnp.isfinite(m_BxHxQ), m_BxHxQ, 0.0) - m_safe)
      l_new = l_BxHxQ * correction + jnp.sum(p_BxHxQxT, axis=-1)
      acc_new = acc_BxHxQxK * correction[..., None] + jnp.einsum(
          'bhqt,bthk->bhqk', p_BxHxQxT.astype(v.dtype), v_BxTxHxK,
          preferred_element_type=jnp.float32)
      return acc_new, m_new, l_new

    init = (jnp.zeros((b, h, block_q, kdim), jnp.float32),
            jnp.full((b, h, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, _kv_blocks_needed(i, causal, block_q, block_kv, num_kv),
                                  kv_step, init)
    l_safe = jnp.where(l > 0, l, 1.0)  # Padded q rows (beyond L) may see nothing.
    out_BxQxHxK = jnp.transpose(acc / l_safe[..., None], (0, 2, 1, 3)).astype(q.dtype)
    return out_BxQxHxK, m + jnp.log(l_safe)

  out_NxBxQxHxK, lse_NxBxHxQ = jax.lax.map(q_block, jnp.arange(num_q))
  out = jnp.moveaxis(out_NxBxQxHxK, 0, 1).reshape(b, len_q, h, kdim)[:, :length]
  lse = jnp.moveaxis(lse_NxBxHxQ, 0, 2).reshape(b, h, len_q)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(q, k, v, causal, block_q, block_kv):
  return _chunked_forward(q, k, v, causal, block_q, block_kv)[0]


def _chunked_fwd(q, k, v, causal, block_q, block_kv):
  out, lse = _chunked_forward(q, k, v, causal, block_q, block_kv)
  return out, (q, k, v, out, lse)


def _chunked_bwd(causal, block_q, block_kv, residuals, dout):
  """Flash-attention backward: per kv block j, loop over the q blocks that see it, recompute
  P = exp(s - lse), accumulate dK_j, dV_j, and add the tile's dQ into a float32 [B, L, H, K]."""
  q, k, v, out, lse_BxHxL = residuals
  b, length, h, kdim = q.shape
  num_q, num_kv, len_q, len_kv = _blocks(length, block_q, block_kv)
  scale = 1.0 / math.sqrt(kdim)
  q_p, k_p, v_p = _pad_to(q, len_q), _pad_to(k, len_kv), _pad_to(v, len_kv)
  dout_p = _pad_to(dout.astype(q.dtype), len_q)
  # D = rowsum(dO * O), the softmax-gradient correction, [B, H, L].
  delta_BxHxL = jnp.einsum('blhk,blhk->bhl', _pad_to(dout, len_q).astype(jnp.float32),
                           _pad_to(out, len_q).astype(jnp.float32))

  def kv_block(dq_BxLxHxK, j):
    k_BxTxHxK = jax.lax.dynamic_slice_in_dim(k_p, j * block_kv, block_kv, axis=1)
    v_BxTxHxK = jax.lax.dynamic_slice_in_dim(v_p, j * block_kv, block_kv, axis=1)

    def q_step(i, carry):
      dk_BxTxHxK, dv_BxTxHxK, dq = carry
      q_BxQxHxK = jax.lax.dynamic_slice_in_dim(q_p, i * block_q, block_q, axis=1)
      do_BxQxHxK = jax.lax.dynamic_slice_in_dim(dout_p, i * block_q, block_q, axis=1)
      lse_BxHxQ = jax.lax.dynamic_slice_in_dim(lse_BxHxL, i * block_q, block_q, axis=2)
      delta_BxHxQ = jax.lax.dynamic_slice_in_dim(delta_BxHxL, i * block_q, block_q, axis=2)
      s, mask_QxT = _masked_scores(q_BxQxHxK, k_BxTxHxK, i * block_q, j * block_kv,
                                   causal=causal, length=length, scale=scale)
      p_BxHxQxT = jnp.where(mask_QxT, jnp.exp(s - lse_BxHxQ[..., None]), 0.0)
      dv_BxTxHxK = dv_BxTxHxK + jnp.einsum('bhqt,bqhk->bthk', p_BxHxQxT.astype(q.dtype),
                                           do_BxQxHxK, preferred_element_type=jnp.float32)
      dp_BxHxQxT = jnp.einsum('bqhk,bthk->bhqt', do_BxQxHxK, v_BxTxHxK,
                              preferred_element_type=jnp.float32)
      ds_BxHxQxT = (p_BxHxQxT * (dp_BxHxQxT - delta_BxHxQ[..., None]) * scale).astype(q.dtype)
      dk_BxTxHxK = dk_BxTxHxK + jnp.einsum('bhqt,bqhk->bthk', ds_BxHxQxT, q_BxQxHxK,
                                           preferred_element_type=jnp.float32)
      dq_tile = jnp.einsum('bhqt,bthk->bqhk', ds_BxHxQxT, k_BxTxHxK,
                           preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, jax.lax.dynamic_slice_in_dim(dq, i * block_q, block_q, axis=1) + dq_tile,
          i * block_q, axis=1)
      return dk_BxTxHxK, dv_BxTxHxK, dq

    # Causal: q blocks ending before this kv block starts see none of it.
    first = (j * block_kv) // block_q if causal else 0
    zeros = jnp.zeros((b, block_kv, h, kdim), jnp.float32)
    dk, dv, dq_BxLxHxK = jax.lax.fori_loop(first, num_q, q_step, (zeros, zeros, dq_BxLxHxK))
    return dq_BxLxHxK, (dk, dv)

  dq, (dk_NxBxTxHxK, dv_NxBxTxHxK) = jax.lax.scan(
      kv_block, jnp.zeros((b, len_q, h, kdim), jnp.float32), jnp.arange(num_kv))

  def unblock(x_NxBxTxHxK):
    return jnp.moveaxis(x_NxBxTxHxK, 0, 1).reshape(b, len_kv, h, kdim)[:, :length]

  return (dq[:, :length].astype(q.dtype), unblock(dk_NxBxTxHxK).astype(k.dtype),
          unblock(dv_NxBxTxHxK).astype(v.dtype))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------- splash (TPU)


def splash_block_sizes(length: int):
  """Splash tile sizes for sequence length L: SPLASH_BLOCK, or L itself when smaller.

  Raises ValueError unless L is a multiple of SPLASH_MIN_BLOCK (the kernels tile L in lanes).
  """
  if length % SPLASH_MIN_BLOCK:
    raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple of "
                     f'{SPLASH_MIN_BLOCK}, got {length}')
  block = math.gcd(length, SPLASH_BLOCK)
  return splash_kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                       block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                       block_q_dq=block, block_kv_dq=block)


def splash_kernel(length: int, num_heads: int, *, causal: bool, head_shards: int = 1,
                  interpret: bool = False):
  """The splash multi-head kernel for [H, L, K] inputs (one sequence; q pre-scaled)."""
  mask_cls = splash_masks.CausalMask if causal else splash_masks.FullMask
  mask = splash_masks.MultiHeadMask([mask_cls((length, length)) for _ in range(num_heads)])
  return splash_kernels.make_splash_mha(mask, block_sizes=splash_block_sizes(length), head_shards=head_shards,
                            q_seq_shards=1, interpret=interpret)


def splash(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *, causal: bool, interpret: bool = False
           ) -> jax.Array:
  """Splash attention; under a mesh (jax.set_mesh) inside jax.shard_map with batch and heads
  sharded by the logical rules 'batch' and 'heads' (the sequence is whole in every shard).

  interpret: run the Pallas kernels in interpret mode (any backend; for tests).
  """
  b, length, h, kdim = q_BxLxHxK.shape
  # Splash does not scale the scores; q is scaled in its own dtype (as MaxText does).
  q_BxHxLxK = jnp.swapaxes(q_BxLxHxK * jnp.asarray(1.0 / math.sqrt(kdim), q_BxLxHxK.dtype), 1, 2)
  k_BxHxLxK, v_BxHxLxK = jnp.swapaxes(k_BxLxHxK, 1, 2), jnp.swapaxes(v_BxLxHxK, 1, 2)
  mesh, rules = jax.sharding.get_abstract_mesh(), spmd.get_logical_axis_rules()

  def local(q, k, v):
    kernel = splash_kernel(length, q.shape[1], causal=causal, interpret=interpret)
    return jax.vmap(kernel)(q, k, v)

  if mesh.empty or not rules:
    out_BxHxLxK = local(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)
  else:
    spec = sharding.logical_to_spec(('batch', 'heads', None, None), q_BxHxLxK.shape, mesh, rules)
    out_BxHxLxK = jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                                check_vma=False)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)
  return jnp.swapaxes(out_BxHxLxK, 1, 2)


def validate(config) -> None:
  """Raises ValueError naming the model.attention* field, the value and what is allowed."""
  if config.attention not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {IMPLEMENTATIONS}, got '
                     f'{config.attention!r}')
  if config.attention == 'cudnn' and config.dtype != 'bfloat16':
    raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16', got "
                     f'{config.dtype!r}')
  for field in ('attention_block_q', 'attention_block_kv', 'attention_block_rows'):
    _check_block(field, config[field])

