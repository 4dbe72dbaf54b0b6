"""Vision Transformer classifier whose every sub-layer is wrapped by a configurable connection.

  images_BxHxWxC -> patches (P x P, flattened) -> linear patch embedding + learned positions
  [-> class token prepended] -> dropout -> streams.expand -> blocks -> streams.reduce
  -> final norm -> pool (class token | mean over patches) -> linear head -> logits_BxC (float32)

The blocks are the trunk's (`trunk.create_blocks` / `trunk.run_blocks`, as the decoder's: the same
connections with sub-layer indices 2l and 2l + 1, branch pre-norm, scan / remat) with
bidirectional attention and no RoPE. Differences from the original ViT, kept for one code path:
no biases inside the blocks, LayerNorm with a learned scale but no bias (config.norm_affine), and
the FFN is config.mlp_activation (the ViT configs use 'gelu'). The patch embedding and the head
have biases (params.Bias: never decayed); the head starts at zero (big_vision).

Dropout (config.vit.dropout, training only) acts on the embedded patches and on the output of
every sub-layer's branch; it needs a key: `model(images, dropout_key=key)`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import connections, params, sharding
from hyperconn_jax.models import layers, trunk

POOLS = ('token', 'gap')


def validate(config) -> None:
  """Raises ValueError naming the model.vit field, the bad value and what is allowed."""
  v = config.vit

  def check(ok, field, allowed):
    if not ok:
      raise ValueError(f'model.vit.{field} must be {allowed}, got {v[field]!r}')

  for field in ('image_size', 'patch_size', 'channels', 'num_classes'):
    check(isinstance(v[field], int) and not isinstance(v[field], bool) and v[field] > 0, field,
          'a positive integer')
  check(v.image_size % v.patch_size == 0, 'patch_size',
        f'a divisor of model.vit.image_size={v.image_size}')
  check(v.pool in POOLS, 'pool', f'one of {POOLS}')
  check(isinstance(v.dropout, (int, float)) and not isinstance(v.dropout, bool)
        and 0 <= v.dropout < 1, 'dropout', 'in [0, 1)')


def num_patches(config) -> int:
  return (config.vit.image_size // config.vit.patch_size) ** 2


def patchify(images_BxHxWxC: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/P) * (W/P), P * P * C], patches in row-major order."""
  b, h, w, c = images_BxHxWxC.shape
  p = patch_size
  x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
  """The classifier; see the module docstring. Build it with models.build_model."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    v, d = config.vit, config.d_model
    e = connections.layout(config.connection, d).embed_width  # The embedding's width.
    pdtype = layers.dtype_of(config.param_dtype)
    self.dtype = layers.dtype_of(config.dtype)
    self.stream_dtype = layers.dtype_of(config.stream_dtype)
    self.patch_size, self.pool, self.dropout = v.patch_size, v.pool, v.dropout
    self.num_layers = config.num_layers
    self.scan_layers = config.scan_layers
    self.scan_unroll = config.scan_unroll
    self.remat_policy = config.remat_policy
    trunk.remat_policy(config.remat_policy)  # Fails before any parameter is created.
    patch_dim = v.patch_size * v.patch_size * v.channels
    self.patch_embed = nnx.Param(
        jax.random.normal(rngs.params(), (patch_dim, e), pdtype) / jnp.sqrt(patch_dim),
        out_sharding=(None, 'embed'))
    self.patch_bias = params.Bias(jnp.zeros((e,), pdtype), out_sharding=('embed',))
    self.positions = params.Embedding(
        config.init_std * jax.random.normal(rngs.params(), (num_patches(config), e), pdtype),
        out_sharding=(None, 'embed'))
    self.cls_token = (params.Embedding(jnp.zeros((e,), pdtype), out_sharding=('embed',))
                      if v.pool == 'token' else None)
    self.streams = connections.build_streams(config.connection, dim=d,
                                             norm_eps=config.norm_eps, rngs=rngs)
    self.blocks = trunk.create_blocks(config, rngs=rngs, causal=False)
    self.final_norm = layers.model_norm(config, d)
    self.head = nnx.Param(jnp.zeros((d, v.num_classes), pdtype), out_sharding=('embed', None))
    self.head_bias = params.Bias(jnp.zeros((v.num_classes,), pdtype), out_sharding=(None,))

  def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
    """float images [B, H, W, C] -> float32 logits [B, num_classes] (no dropout)."""
    return self.forward(images_BxHxWxC).logits

  def forward(self, images_BxHxWxC: jax.Array, *, return_hidden: bool = False,
              dropout_key: jax.Array | None = None) -> trunk.ModelOutput:
    """float images [B, H, W, C] -> ModelOutput (logits [B, num_classes]; hidden's L counts the
    patches and the class token, first). dropout_key: None at evaluation; a key in training when
    config.vit.dropout > 0."""
    patches_BxLxP = patchify(images_BxHxWxC.astype(self.dtype), self.patch_size)
    h_BxLxD = (jnp.einsum('blp,pd->bld', patches_BxLxP, self.patch_embed[...].astype(self.dtype))
               + self.patch_bias[...].astype(self.dtype)
               + self.positions[...].astype(self.dtype))
    if self.cls_token is not None:
      cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                                   (h_BxLxD.shape[0], 1, h_BxLxD.shape[-1]))
      h_BxLxD = jnp.concatenate([cls_Bx1xD, h_BxLxD], axis=1)
    embed_key = block_keys = None
    if dropout_key is not None and self.dropout > 0:
      embed_key, block_keys = jax.random.split(dropout_key)
    h_BxLxD = layers.dropout(h_BxLxD, self.dropout, embed_key)
    x_BxLxNxD = sharding.constrain(self.streams.expand(h_BxLxD.astype(self.stream_dtype)),
                                   trunk.STREAMS_AXES)
    x_BxLxNxD, hidden, aux = trunk.run_blocks(
        self.blocks, x_BxLxNxD, num_layers=self.num_layers, scan_layers=self.scan_layers,
        unroll=self.scan_unroll,
        policy_name=self.remat_policy,
        return_hidden=return_hidden, dropout=(self.dropout, block_keys))
    h_BxLxD = self.final_norm(self.streams.reduce(x_BxLxNxD))
    pooled_BxD = h_BxLxD[:, 0] if self.cls_token is not None else jnp.mean(h_BxLxD, axis=1)
    logits_BxC = jnp.einsum('bd,dc->bc', pooled_BxD.astype(self.dtype),
                            self.head[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
    logits_BxC = logits_BxC + self.head_bias[...].astype(jnp.float32)
    return trunk.ModelOutput(logits_BxC, hidden, aux)
