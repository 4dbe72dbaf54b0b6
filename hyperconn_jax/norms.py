"""Normalisation layers shared by the model and the connections (computed in float32)."""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import params

NORM_KINDS = ('layernorm', 'rmsnorm', 'none')


def normalize(x: jax.Array, kind: str, eps: float) -> jax.Array:
  """Normalises over the last axis without affine parameters; returns float32.

  Args:
    x: any shape [..., D].
    kind: 'layernorm' (subtract mean, divide by std), 'rmsnorm' (divide by RMS) or 'none'.
    eps: added to the variance.
  """
  x = x.astype(jnp.float32)
  if kind == 'layernorm':
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  elif kind == 'none':
    return x
  elif kind != 'rmsnorm':
    raise ValueError(f'norm kind must be one of {NORM_KINDS}, got {kind!r}')
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class Norm(nnx.Module):
  """LayerNorm (OLMo: no affine) or RMSNorm over the last axis, optionally with a learned scale.

  Takes x of shape [..., D] in any dtype and returns the same shape in x's dtype.
  """

  def __init__(self, dim: int, *, kind: str, eps: float, affine: bool,
               axis_name: str = 'embed', param_dtype=jnp.float32):
    if kind not in NORM_KINDS:
      raise ValueError(f'norm must be one of {NORM_KINDS}, got {kind!r}')
    self.kind, self.eps = kind, eps
    self.scale = (params.NormScale(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
                  if affine else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = normalize(x, self.kind, self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    return y.astype(x.dtype)


def inv_std(x: jax.Array, norm: Norm) -> jax.Array:
  """1 / (the std (layernorm) or RMS (rmsnorm) of x over its last axis) as `norm` computes it,
  float32 [...] (the analyses write a norm as this per-token scale)."""
  x = x.astype(jnp.float32)
  if norm.kind == 'layernorm':
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1) + norm.eps)
