"""The transformer trunk shared by the decoder LM and the ViT: blocks of two sub-layers, each
wrapped by its own connection, stacked or in a Python list.

Each block has two sub-layers, attention (sub-layer k = 2l) and the FFN (k = 2l + 1: a dense MLP,
or a mixture of experts when config.ffn == 'moe'), each with its own connection module from
`connections.build_connection`; a branch applies its own pre-norm iff its connection says
`branch_prenorm`. Blocks are either stacked (nnx.vmap at creation, nnx.scan over the stream carry
x_BxLxNxD) or a Python list (`create_blocks` / `run_blocks`); `copy_weights` converts a model
between the two layouts. MoE auxiliary outputs (losses, expert load) leave the blocks as per-layer
scan outputs and are averaged over layers. `config` below is `config.model`.
"""

from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import connections, sharding
from hyperconn_jax.models import attention
from hyperconn_jax.models import layers
from hyperconn_jax.models import moe

REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_streams', 'offload_streams')

# Name of the tensors the 'save_streams' policy keeps and 'offload_streams' moves to host memory:
# the stream state entering every block and after every sub-layer.
STREAMS_CHECKPOINT_NAME = 'streams'

# Logical axes of the activations (applied only under sharding.activate).
STREAMS_AXES = ('batch', 'length', 'streams', None)

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
      # The n x d stream state of every block lives in host memory between the forward and the
      # backward pass (MaxText's decoder_layer_input offload), so device memory does not grow
      # with n x layers; everything else is recomputed.
      'offload_streams': jax.checkpoint_policies.save_and_offload_only_these_names(
          names_which_can_be_saved=(), names_which_can_be_offloaded=(STREAMS_CHECKPOINT_NAME,),
          offload_src='device', offload_dst='pinned_host'),
  }
  if name not in policies:
    raise ValueError(f'model.remat_policy must be one of {REMAT_POLICIES}, got {name!r}')
  return policies[name]


def ffn(config, *, out_init_multiplier: float, rngs: nnx.Rngs) -> nnx.Module:
  """The FFN sub-layer: y_BxLxD -> (y_BxLxD, aux) for config.ffn='moe', y_BxLxD otherwise."""
  if config.ffn == 'moe':
    return moe.MoE(config, out_init_multiplier=out_init_multiplier, rngs=rngs)
  return layers.MLP(config, out_init_multiplier=out_init_multiplier, rngs=rngs)


class Block(nnx.Module):
  """Attention and FFN sub-layers, each wrapped by its own connection.

  `layer_index` may be traced (blocks are created under nnx.vmap); it sets the connections'
  sub-layer indices 2 * layer_index and 2 * layer_index + 1. `causal`: causal attention with RoPE
  (decoder) or bidirectional attention without RoPE (ViT).
  """

  def __init__(self, config, layer_index, *, rngs: nnx.Rngs, causal: bool = True):
    conn, d = config.connection, config.d_model
    out_mult = (connections.out_proj_init_multiplier(conn)
                * layers.out_layer_multiplier(config, layer_index))

    def connection(sublayer_index):
      return connections.build_connection(conn, dim=d, sublayer_index=sublayer_index,
                                          norm_kind=config.norm, norm_eps=config.norm_eps,
                                          rngs=rngs)

    self.attn_connection = connection(2 * layer_index)
    self.attn_norm = (layers.model_norm(config, d) if self.attn_connection.branch_prenorm
                      else None)
    self.attn = layers.Attention(config, out_init_multiplier=out_mult, rngs=rngs, causal=causal)
    self.mlp_connection = connection(2 * layer_index + 1)
    self.mlp_norm = (layers.model_norm(config, d) if self.mlp_connection.branch_prenorm
                     else None)
    self.mlp = ffn(config, out_init_multiplier=out_mult, rngs=rngs)

  def __call__(self, x_BxLxNxD: jax.Array, return_hidden: bool = False,
               dropout_rate: float = 0.0, dropout_key: jax.Array | None = None):
    """Returns (x_BxLxNxD, hidden, aux): hidden is [2, B, L, D], the inputs the attention and the
    FFN branches received (before their pre-norm), if return_hidden, else None; aux is the MoE's
    auxiliary outputs ({} for a dense FFN). With a dropout_key, dropout of dropout_rate is applied
    to both branch outputs (ViT training)."""
    branch_inputs, aux = [], {}
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    # Named so that a remat policy can keep (or offload) the block input instead of the scan
    # saving the raw carry on the device.
    x_BxLxNxD = checkpoint_name(x_BxLxNxD, STREAMS_CHECKPOINT_NAME)

    def sublayer(connection, norm, layer, x_BxLxNxD, key):
      def branch(h_BxLxD):
        branch_inputs.append(h_BxLxD)
        out = layer(h_BxLxD if norm is None else norm(h_BxLxD))
        if isinstance(out, tuple):  # An MoE: (y_BxLxD, aux).
          out, layer_aux = out
          aux.update(layer_aux)
        return layers.dropout(out, dropout_rate, key)
      x_BxLxNxD = sharding.constrain(connection(x_BxLxNxD, branch), STREAMS_AXES)
      return checkpoint_name(x_BxLxNxD, STREAMS_CHECKPOINT_NAME)

    x_BxLxNxD = sublayer(self.attn_connection, self.attn_norm, self.attn, x_BxLxNxD, keys[0])
    x_BxLxNxD = sublayer(self.mlp_connection, self.mlp_norm, self.mlp, x_BxLxNxD, keys[1])
    return x_BxLxNxD, (jnp.stack(branch_inputs) if return_hidden else None), aux


def create_blocks(config, *, rngs: nnx.Rngs, causal: bool = True):
  """config.num_layers Blocks: stacked on a leading 'layers' axis (config.scan_layers) or a list."""
  if config.scan_layers:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def create(layer_index, rngs):
      return Block(config, layer_index, rngs=rngs, causal=causal)
    return create(jnp.arange(config.num_layers), rngs)
  return nnx.List([Block(config, l, rngs=rngs, causal=causal) for l in range(config.num_layers)])


# config.scan_unroll=0 unrolls models up to this deep on CPU; deeper ones keep the loop, whose
# compile time stays flat in depth (unrolled, 16 layers compile 1.6-1.7x as long as 4).
CPU_UNROLL_MAX_LAYERS = 8


def scan_unroll(unroll: int, num_layers: int, policy_name: str = 'none') -> int:
  """Layers per scan iteration for config.scan_unroll (0, auto: all of them on CPU up to
  CPU_UNROLL_MAX_LAYERS layers without remat, else 1; see configs/base.py), on the platform of
  the mesh set with jax.set_mesh (attention.platform). policy_name: config.remat_policy."""
  if unroll == 0:
    # Unrolled, XLA:CPU undoes remat (it drops the barriers that keep the recomputation apart
    # and CSEs it with the forward pass): DHC x4 'save_streams' took 594 MiB instead of 264.
    cpu = attention.platform() == 'cpu'
    unrolls = cpu and num_layers <= CPU_UNROLL_MAX_LAYERS and policy_name == 'none'
    return num_layers if unrolls else 1
  return min(unroll, num_layers)


def run_blocks(blocks, x_BxLxNxD: jax.Array, *, num_layers: int, scan_layers: bool,
               unroll: int, policy_name: str, return_hidden: bool,
               dropout: tuple[float, jax.Array | None] = (0.0, None)):
  """Applies the blocks of `create_blocks` in order.

  unroll: config.scan_unroll (scan_layers only; see scan_unroll).

  dropout: (rate, key): with a key, every block applies dropout to its branch outputs (a key per
  block, split from this one).

  Returns (x_BxLxNxD, hidden, aux): hidden is [K, 2, B, L, D] if return_hidden (else None); aux
  holds each MoE output averaged over the K layers ({} for dense FFNs).
  """
  rate, key = dropout
  def block_fn(block, x_BxLxNxD, block_key):
    return block(x_BxLxNxD, return_hidden, rate, block_key)

  policy = remat_policy(policy_name)
  if policy_name != 'none':
    block_fn = nnx.remat(block_fn, policy=policy)

  keys = None if key is None else jax.random.split(key, num_layers)
  if scan_layers:
    # No transform_metadata here: nothing in the body reads sharding metadata, and flax 0.12.8
    # cannot remove the 'layers' name from scalars (out_sharding=()), which vmap never added.
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0),
              unroll=scan_unroll(unroll, num_layers, policy_name))
    def scan_fn(block, x_BxLxNxD, block_key):
      return block_fn(block, x_BxLxNxD, block_key)
    x_BxLxNxD, hidden, aux = scan_fn(blocks, x_BxLxNxD, keys)
  else:
    per_block = []
    for l, block in enumerate(blocks):
      x_BxLxNxD, block_hidden, block_aux = block_fn(block, x_BxLxNxD,
                                                    None if keys is None else keys[l])
      per_block.append((block_hidden, block_aux))
    hidden = jnp.stack([h for h, _ in per_block]) if return_hidden else None
    aux = jax.tree.map(lambda *a: jnp.stack(a), *[a for _, a in per_block])
  return x_BxLxNxD, hidden, jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)


class ModelOutput(NamedTuple):
  """What a model's `forward` returns (the same structure whatever is asked).

  logits: float32 [B, L, V] (decoder) or [B, num_classes] (ViT).
  hidden: [K, 2, B, L, D], for each of the K blocks the inputs of its attention and FFN branches
    (before their pre-norm), if asked (return_hidden), else None.
  aux: the MoE auxiliary outputs averaged over layers (see moe.MoE); {} for a dense FFN.
  """
  logits: jax.Array
  hidden: jax.Array | None
  aux: dict


def copy_weights(src: nnx.Module, dst: nnx.Module) -> None:
  """Copies every parameter of model `src` into model `dst` (same config up to `scan_layers`;
  decoder or ViT: any model with `blocks` from create_blocks), converting
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
