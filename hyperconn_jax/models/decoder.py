"""Decoder-only LM (OLMo style) whose every sub-layer is wrapped by a configurable connection.

  tokens_BxL -> embed -> streams.expand -> blocks -> streams.reduce -> final norm -> unembed
  -> logits_BxLxV (float32)

Each block has two sub-layers, attention (sub-layer k = 2l) and SwiGLU MLP (k = 2l + 1), each with
its own connection module from `connections.build_connection`; a branch applies its own pre-norm
iff its connection says `branch_prenorm`. Blocks are either stacked (nnx.vmap at creation,
nnx.scan over the stream carry x_BxLxNxD) or a Python list; `copy_weights` converts between the
two layouts. `config` below is `config.model` (see configs/base.py).
"""

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import connections, sharding
from hyperconn_jax.models import layers

REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_streams')

# Name of the tensors the 'save_streams' policy keeps: the stream state after every sub-layer.
STREAMS_CHECKPOINT_NAME = 'streams'

# Logical axes of the activations (applied only under sharding.activate).
STREAMS_AXES = ('batch', 'length', 'streams', None)
LOGITS_AXES = ('batch', 'length', 'vocab')

# Attribute names of the modules that belong to the connection (used to split parameter counts).
CONNECTION_ATTRS = ('streams', 'attn_connection', 'mlp_connection')


def remat_policy(name: str):
  """Maps config.model.remat_policy to a jax.checkpoint policy (None for 'none': no remat)."""
  policies = {
      'none': None,
      'full': jax.checkpoint_policies.nothing_saveable,
      'dots': jax.checkpoint_policies.dots_saveable,
      'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      'save_streams': jax.checkpoint_policies.save_only_these_names(STREAMS_CHECKPOINT_NAME),
  }
  if name not in policies:
    raise ValueError(f'model.remat_policy must be one of {REMAT_POLICIES}, got {name!r}')
  return policies[name]


class Block(nnx.Module):
  """Attention and MLP sub-layers, each wrapped by its own connection.

  `layer_index` may be traced (blocks are created under nnx.vmap); it sets the connections'
  sub-layer indices 2 * layer_index and 2 * layer_index + 1.
  """

  def __init__(self, config, layer_index, *, rngs: nnx.Rngs):
    conn, d = config.connection, config.d_model
    out_mult = connections.out_proj_init_multiplier(conn)

    def connection(sublayer_index):
      return connections.build_connection(conn, dim=d, sublayer_index=sublayer_index,
                                          norm_kind=config.norm, norm_eps=config.norm_eps,
                                          rngs=rngs)

    self.attn_connection = connection(2 * layer_index)
    self.attn_norm = (layers.model_norm(config, d) if self.attn_connection.branch_prenorm
                      else None)
    self.attn = layers.Attention(config, out_init_multiplier=out_mult, rngs=rngs)
    self.mlp_connection = connection(2 * layer_index + 1)
    self.mlp_norm = (layers.model_norm(config, d) if self.mlp_connection.branch_prenorm
                     else None)
    self.mlp = layers.MLP(config, out_init_multiplier=out_mult, rngs=rngs)

  def __call__(self, x_BxLxNxD: jax.Array, return_hidden: bool = False):
    """Returns (x_BxLxNxD, hidden): hidden is [2, B, L, D], the inputs the attention and the MLP
    branches received (before their pre-norm), if return_hidden, else None."""
    branch_inputs = []

    def sublayer(connection, norm, layer, x_BxLxNxD):
      def branch(h_BxLxD):
        branch_inputs.append(h_BxLxD)
        return layer(h_BxLxD if norm is None else norm(h_BxLxD))
      x_BxLxNxD = sharding.constrain(connection(x_BxLxNxD, branch), STREAMS_AXES)
      return checkpoint_name(x_BxLxNxD, STREAMS_CHECKPOINT_NAME)

    x_BxLxNxD = sublayer(self.attn_connection, self.attn_norm, self.attn, x_BxLxNxD)
    x_BxLxNxD = sublayer(self.mlp_connection, self.mlp_norm, self.mlp, x_BxLxNxD)
    return x_BxLxNxD, (jnp.stack(branch_inputs) if return_hidden else None)


class DecoderLM(nnx.Module):
  """Decoder-only LM; see the module docstring. Build it with models.build_model."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    d = config.d_model
    self.num_layers = config.num_layers
    self.scan_layers = config.scan_layers
    self.remat_policy = config.remat_policy
    remat_policy(config.remat_policy)  # Fails before any parameter is created.
    self.embed = layers.Embed(config, rngs=rngs)
    self.streams = connections.build_streams(config.connection, dim=d,
                                             norm_eps=config.norm_eps, rngs=rngs)
    if config.scan_layers:
      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def create_blocks(layer_index, rngs):
        return Block(config, layer_index, rngs=rngs)
      self.blocks = create_blocks(jnp.arange(config.num_layers), rngs)
    else:
      self.blocks = nnx.List([Block(config, l, rngs=rngs) for l in range(config.num_layers)])
    self.final_norm = layers.model_norm(config, d)
    self.unembed = None if config.tie_embeddings else nnx.Param(
        config.init_std * jax.random.normal(rngs.params(), (d, config.vocab_size),
                                            layers.dtype_of(config.param_dtype)),
        out_sharding=('embed', 'vocab'))
    self.dtype = layers.dtype_of(config.dtype)

  def __call__(self, tokens_BxL: jax.Array, return_hidden: bool = False):
    """int tokens [B, L] -> float32 logits [B, L, V].

    With return_hidden, returns (logits_BxLxV, hidden_Kx2xBxLxD): for each of the K blocks, the
    inputs of its attention and MLP branches (before their pre-norm).
    """
    return self.logits_from_embeddings(self.embed(tokens_BxL), return_hidden)

  def logits_from_embeddings(self, h_BxLxD: jax.Array, return_hidden: bool = False):
    """Same as __call__ but starting from the token embeddings [B, L, D]."""
    x_BxLxNxD = sharding.constrain(self.streams.expand(h_BxLxD.astype(self.dtype)), STREAMS_AXES)
    x_BxLxNxD, hidden = self._run_blocks(x_BxLxNxD, return_hidden)
    h_BxLxD = self.final_norm(self.streams.reduce(x_BxLxNxD))
    if self.unembed is None:
      logits_BxLxV = self.embed.attend(h_BxLxD)
    else:
      logits_BxLxV = jnp.einsum('bld,dv->blv', h_BxLxD.astype(self.dtype),
                                self.unembed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
    logits_BxLxV = sharding.constrain(logits_BxLxV, LOGITS_AXES)
    return (logits_BxLxV, hidden) if return_hidden else logits_BxLxV

  def _run_blocks(self, x_BxLxNxD: jax.Array, return_hidden: bool):
    def block_fn(block, x_BxLxNxD):
      return block(x_BxLxNxD, return_hidden)

    policy = remat_policy(self.remat_policy)
    if self.remat_policy != 'none':
      block_fn = nnx.remat(block_fn, policy=policy)

    if self.scan_layers:
      # No transform_metadata here: nothing in the body reads sharding metadata, and flax 0.12.8
      # cannot remove the 'layers' name from scalars (out_sharding=()), which vmap never added.
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
      def scan_fn(block, x_BxLxNxD):
        return block_fn(block, x_BxLxNxD)
      return scan_fn(self.blocks, x_BxLxNxD)

    hidden = []
    for block in self.blocks:
      x_BxLxNxD, block_hidden = block_fn(block, x_BxLxNxD)
      hidden.append(block_hidden)
    return x_BxLxNxD, (jnp.stack(hidden) if return_hidden else None)


def copy_weights(src: DecoderLM, dst: DecoderLM) -> None:
  """Copies every parameter of `src` into `dst` (same config up to `scan_layers`), converting
  between the stacked (scanned) and the per-block (Python loop) layout of the blocks."""
  pure = nnx.to_pure_dict(nnx.state(src))
  if src.scan_layers and not dst.scan_layers:
    stacked = pure['blocks']
    pure['blocks'] = {l: jax.tree.map(lambda a, l=l: a[l], stacked)
                      for l in range(src.num_layers)}
  elif dst.scan_layers and not src.scan_layers:
    per_block = [pure['blocks'][l] for l in range(src.num_layers)]
    pure['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *per_block)
  state = nnx.state(dst)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)
