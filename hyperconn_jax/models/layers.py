"""Transformer layers in the OLMo style: token embedding, RoPE, causal attention, SwiGLU MLP.

No biases anywhere. Every parameter carries logical axis names (`out_sharding`); activations are
computed in `config.dtype`, parameters kept in `config.param_dtype`, softmax in float32. The
attention itself is `models/attention.py` (config.model.attention). Weights start as
config.model.init says: 'normal' (std init_std) or OLMo's 'mitchell' (`init_weight`).
`config` below is `config.model` (see configs/base.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperconn_jax import norms, params
from hyperconn_jax.models import attention

INITS = ('normal', 'mitchell')


def dtype_of(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' -> the jnp dtype."""
  return jnp.dtype(name)


def init_weight(config, rngs: nnx.Rngs, shape: tuple[int, ...], *, fan_in: int,
                multiplier=1.0) -> jax.Array:
  """A weight matrix in config.param_dtype, times `multiplier` (may be traced).

  config.init 'normal': normal of std config.init_std; 'mitchell' (OLMo): normal of std
  1/sqrt(fan_in) truncated at 3 std.
  """
  dtype = dtype_of(config.param_dtype)
  if config.init == 'mitchell':
    std = multiplier / fan_in ** 0.5
    return (std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, dtype)
            ).astype(dtype)
  std = config.init_std * multiplier
  return (std * jax.random.normal(rngs.params(), shape, dtype)).astype(dtype)


def out_layer_multiplier(config, layer_index):
  """Extra init factor of the output projections of block `layer_index` (may be traced):
  1/sqrt(2 (l + 1)) for config.init 'mitchell' (OLMo), 1 otherwise."""
  if config.init == 'mitchell':
    return jax.lax.rsqrt(2.0 * (jnp.asarray(layer_index, jnp.float32) + 1.0))
  return 1.0


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout of `rate` with `key`; the identity when key is None or rate is 0."""
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def project(x: jax.Array, w: jax.Array, *, in_axes: int = 1,
            preferred_element_type=None) -> jax.Array:
  """x [..., *I] times w [*I, *O] -> [..., *O] (I: x's last `in_axes` axes), as one 2-D matmul
  of the flattened rows [prod(...), prod(I)] x [prod(I), prod(O)].

  The same product as the einsum; written 2-D because XLA:CPU turns the weight gradient of a
  3-D einsum ('bld,df->blf') into a slow transposing copy of the [B, L, F] cotangent, about half
  the step time of the MLP's backward (docs/performance.md).
  """
  lead, inner, outer = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:], w.shape[in_axes:]
  if w.shape[:in_axes] != inner:
    raise ValueError(f'project: x {x.shape} and w {w.shape} disagree on the contracted axes')
  rows = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1),
                 preferred_element_type=preferred_element_type)
  return rows.reshape(*lead, *outer)


def model_norm(config, dim: int, axis_name: str = 'embed') -> norms.Norm:
  """The model's norm: LayerNorm without affine (OLMo; with a learned scale if
  config.norm_affine) or RMSNorm with a learned scale."""
  return norms.Norm(dim, kind=config.norm, eps=config.norm_eps,
                    affine=config.norm == 'rmsnorm' or config.norm_affine,
                    axis_name=axis_name, param_dtype=dtype_of(config.param_dtype))


class Embed(nnx.Module):
  """Token embedding table [V, E] (E: `width`, the connection's embedding width, by default
  config.d_model); `attend` is the tied unembedding (E = D only)."""

  def __init__(self, config, *, rngs: nnx.Rngs, width: int | None = None):
    self.dtype = dtype_of(config.dtype)
    self.embedding = params.Embedding(
        init_weight(config, rngs, (config.vocab_size, width or config.d_model),
                    fan_in=config.d_model),
        out_sharding=('vocab', 'embed'))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """int tokens [B, L] -> embeddings [B, L, E] in the compute dtype."""
    return jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(self.dtype)

  def attend(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> float32 logits [B, L, V] against the embedding table."""
    return project(h_BxLxD.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                   preferred_element_type=jnp.float32)


def rope(x_BxLxHxK: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) at positions 0..L-1; returns x's dtype."""
  length, head_dim = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
  half = head_dim // 2
  # The [L, K/2] tables are trace-time constants (float64, then float32): computed in the graph,
  # XLA:CPU fuses sin / cos into every element of the [B, L, H, K] products, forward and
  # backward, evaluating them B x H times over (~10% of a CPU train step at d = 256).
  inv_freq_K2 = 1.0 / theta ** (np.arange(half, dtype=np.float64) / half)
  angles_LxK2 = np.arange(length, dtype=np.float64)[:, None] * inv_freq_K2[None, :]
  sin_1xLx1xK2 = jnp.asarray(np.sin(angles_LxK2), jnp.float32)[None, :, None, :]
  cos_1xLx1xK2 = jnp.asarray(np.cos(angles_LxK2), jnp.float32)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_1xLx1xK2 - x2 * sin_1xLx1xK2,
                         x2 * cos_1xLx1xK2 + x1 * sin_1xLx1xK2], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention (causal with RoPE for the decoder; bidirectional without RoPE
  for the ViT, which adds learned positions to its patches) and optional per-head QK-norm; the
  attention implementation is config.attention (models/attention.py).

  Takes y_BxLxD (already normalised by the caller when Pre-Norm) and returns [B, L, D].
  """

  def __init__(self, config, *, out_init_multiplier, rngs: nnx.Rngs, causal: bool = True):
    d, h, k = config.d_model, config.num_heads, config.head_dim
    self.dtype = dtype_of(config.dtype)
    self.rope_theta = config.rope_theta
    self.causal = causal
    self.implementation = config.attention
    self.blocks = dict(block_q=config.attention_block_q, block_kv=config.attention_block_kv,
                       block_rows=config.attention_block_rows)
    in_axes = ('embed', 'heads', 'kv')
    self.q = nnx.Param(init_weight(config, rngs, (d, h, k), fan_in=d), out_sharding=in_axes)
    self.k = nnx.Param(init_weight(config, rngs, (d, h, k), fan_in=d), out_sharding=in_axes)
    self.v = nnx.Param(init_weight(config, rngs, (d, h, k), fan_in=d), out_sharding=in_axes)
    # OLMo's mitchell init uses d_model as the fan-in of the output projection too.
    self.o = nnx.Param(init_weight(config, rngs, (h, k, d), fan_in=d,
                                   multiplier=out_init_multiplier),
                       out_sharding=('heads', 'kv', 'embed'))
    self.q_norm = model_norm(config, k, axis_name='kv') if config.qk_norm else None
    self.k_norm = model_norm(config, k, axis_name='kv') if config.qk_norm else None

  def __call__(self, y_BxLxD: jax.Array) -> jax.Array:
    y_BxLxD = y_BxLxD.astype(self.dtype)
    q_BxLxHxK = project(y_BxLxD, self.q[...].astype(self.dtype))
    k_BxLxHxK = project(y_BxLxD, self.k[...].astype(self.dtype))
    v_BxLxHxK = project(y_BxLxD, self.v[...].astype(self.dtype))
    if self.q_norm is not None:
      q_BxLxHxK, k_BxLxHxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxHxK)
    if self.causal:
      q_BxLxHxK = rope(q_BxLxHxK, self.rope_theta)
      k_BxLxHxK = rope(k_BxLxHxK, self.rope_theta)
    out_BxLxHxK = attention.attend(
        q_BxLxHxK.astype(self.dtype), k_BxLxHxK.astype(self.dtype), v_BxLxHxK,
        causal=self.causal, implementation=self.implementation, **self.blocks)
    return project(out_BxLxHxK, self.o[...].astype(self.dtype), in_axes=2)


class MLP(nnx.Module):
  """Feed-forward [B, L, D] -> [B, L, D]: SwiGLU down(silu(gate(y)) * up(y)) or, with
  config.mlp_activation='gelu' (ViT), down(gelu(up(y)))."""

  def __init__(self, config, *, out_init_multiplier, rngs: nnx.Rngs):
    d, f = config.d_model, config.mlp_dim
    self.dtype = dtype_of(config.dtype)
    self.gate = (nnx.Param(init_weight(config, rngs, (d, f), fan_in=d),
                           out_sharding=('embed', 'mlp'))
                 if config.mlp_activation == 'swiglu' else None)
    self.up = nnx.Param(init_weight(config, rngs, (d, f), fan_in=d),
                        out_sharding=('embed', 'mlp'))
    self.down = nnx.Param(init_weight(config, rngs, (f, d), fan_in=f,
                                      multiplier=out_init_multiplier),
                          out_sharding=('mlp', 'embed'))

  def __call__(self, y_BxLxD: jax.Array) -> jax.Array:
    y_BxLxD = y_BxLxD.astype(self.dtype)
    up_BxLxF = project(y_BxLxD, self.up[...].astype(self.dtype))
    if self.gate is None:
      hidden_BxLxF = jax.nn.gelu(up_BxLxF)
    else:
      gate_BxLxF = project(y_BxLxD, self.gate[...].astype(self.dtype))
      hidden_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    return project(hidden_BxLxF, self.down[...].astype(self.dtype))
