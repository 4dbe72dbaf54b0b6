"""Transformer layers in the OLMo style: token embedding, RoPE, causal attention, SwiGLU MLP.

No biases anywhere. Every parameter carries logical axis names (`out_sharding`); activations are
computed in `config.dtype`, parameters kept in `config.param_dtype`, softmax in float32.
`config` below is `config.model` (see configs/base.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import norms, params


def dtype_of(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' -> the jnp dtype."""
  return jnp.dtype(name)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  return std * jax.random.normal(rngs.params(), shape, dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout of `rate` with `key`; the identity when key is None or rate is 0."""
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


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
        _normal(rngs, (config.vocab_size, width or config.d_model), config.init_std,
                dtype_of(config.param_dtype)),
        out_sharding=('vocab', 'embed'))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """int tokens [B, L] -> embeddings [B, L, E] in the compute dtype."""
    return jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(self.dtype)

  def attend(self, h_BxLxD: jax.Array) -> jax.Array:
    """[B, L, D] -> float32 logits [B, L, V] against the embedding table."""
    return jnp.einsum('bld,vd->blv', h_BxLxD.astype(self.dtype),
                      self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


def rope(x_BxLxHxK: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) at positions 0..L-1; returns x's dtype."""
  length, head_dim = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
  half = head_dim // 2
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
  sin_1xLx1xK2 = jnp.sin(angles_LxK2)[None, :, None, :]
  cos_1xLx1xK2 = jnp.cos(angles_LxK2)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_1xLx1xK2 - x2 * sin_1xLx1xK2,
                         x2 * cos_1xLx1xK2 + x1 * sin_1xLx1xK2], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention (causal with RoPE for the decoder; bidirectional without RoPE
  for the ViT, which adds learned positions to its patches) and optional per-head QK-norm.

  Takes y_BxLxD (already normalised by the caller when Pre-Norm) and returns [B, L, D].
  """

  def __init__(self, config, *, out_init_multiplier: float, rngs: nnx.Rngs, causal: bool = True):
    d, h, k = config.d_model, config.num_heads, config.head_dim
    pdtype = dtype_of(config.param_dtype)
    self.dtype = dtype_of(config.dtype)
    self.rope_theta = config.rope_theta
    self.causal = causal
    in_axes = ('embed', 'heads', 'kv')
    self.q = nnx.Param(_normal(rngs, (d, h, k), config.init_std, pdtype), out_sharding=in_axes)
    self.k = nnx.Param(_normal(rngs, (d, h, k), config.init_std, pdtype), out_sharding=in_axes)
    self.v = nnx.Param(_normal(rngs, (d, h, k), config.init_std, pdtype), out_sharding=in_axes)
    self.o = nnx.Param(_normal(rngs, (h, k, d), config.init_std * out_init_multiplier, pdtype),
                       out_sharding=('heads', 'kv', 'embed'))
    self.q_norm = model_norm(config, k, axis_name='kv') if config.qk_norm else None
    self.k_norm = model_norm(config, k, axis_name='kv') if config.qk_norm else None

  def __call__(self, y_BxLxD: jax.Array) -> jax.Array:
    y_BxLxD = y_BxLxD.astype(self.dtype)
    q_BxLxHxK = jnp.einsum('bld,dhk->blhk', y_BxLxD, self.q[...].astype(self.dtype))
    k_BxLxHxK = jnp.einsum('bld,dhk->blhk', y_BxLxD, self.k[...].astype(self.dtype))
    v_BxLxHxK = jnp.einsum('bld,dhk->blhk', y_BxLxD, self.v[...].astype(self.dtype))
    if self.q_norm is not None:
      q_BxLxHxK, k_BxLxHxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxHxK)
    if self.causal:
      q_BxLxHxK = rope(q_BxLxHxK, self.rope_theta)
      k_BxLxHxK = rope(k_BxLxHxK, self.rope_theta)
    length, head_dim = y_BxLxD.shape[1], q_BxLxHxK.shape[-1]
    scores_BxHxLxL = jnp.einsum('bqhk,bthk->bhqt', q_BxLxHxK, k_BxLxHxK,
                                preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
    if self.causal:
      causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
      scores_BxHxLxL = jnp.where(causal_LxL, scores_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(self.dtype)
    out_BxLxHxK = jnp.einsum('bhqt,bthk->bqhk', probs_BxHxLxL, v_BxLxHxK)
    return jnp.einsum('blhk,hkd->bld', out_BxLxHxK, self.o[...].astype(self.dtype))


class MLP(nnx.Module):
  """Feed-forward [B, L, D] -> [B, L, D]: SwiGLU down(silu(gate(y)) * up(y)) or, with
  config.mlp_activation='gelu' (ViT), down(gelu(up(y)))."""

  def __init__(self, config, *, out_init_multiplier: float, rngs: nnx.Rngs):
    d, f = config.d_model, config.mlp_dim
    pdtype = dtype_of(config.param_dtype)
    self.dtype = dtype_of(config.dtype)
    self.gate = (nnx.Param(_normal(rngs, (d, f), config.init_std, pdtype),
                           out_sharding=('embed', 'mlp'))
                 if config.mlp_activation == 'swiglu' else None)
    self.up = nnx.Param(_normal(rngs, (d, f), config.init_std, pdtype),
                        out_sharding=('embed', 'mlp'))
    self.down = nnx.Param(_normal(rngs, (f, d), config.init_std * out_init_multiplier, pdtype),
                          out_sharding=('mlp', 'embed'))

  def __call__(self, y_BxLxD: jax.Array) -> jax.Array:
    y_BxLxD = y_BxLxD.astype(self.dtype)
    up_BxLxF = jnp.einsum('bld,df->blf', y_BxLxD, self.up[...].astype(self.dtype))
    if self.gate is None:
      hidden_BxLxF = jax.nn.gelu(up_BxLxF)
    else:
      gate_BxLxF = jnp.einsum('bld,df->blf', y_BxLxD, self.gate[...].astype(self.dtype))
      hidden_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    return jnp.einsum('blf,fd->bld', hidden_BxLxF, self.down[...].astype(self.dtype))
