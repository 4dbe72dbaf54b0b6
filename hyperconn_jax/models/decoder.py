"""Decoder-only LM (OLMo style) whose every sub-layer is wrapped by a configurable connection.

  tokens_BxL -> embed -> streams.expand -> blocks -> streams.reduce -> final norm -> unembed
  -> logits_BxLxV (float32)

The blocks are the transformer trunk (trunk.py, shared with the ViT) with causal attention and
RoPE. `config` below is `config.model` (see configs/base.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import connections, sharding
from hyperconn_jax.models import layers
from hyperconn_jax.models import trunk

LOGITS_AXES = ('batch', 'length', 'vocab')


class DecoderLM(nnx.Module):
  """Decoder-only LM; see the module docstring. Build it with models.build_model."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    d = config.d_model
    self.num_layers = config.num_layers
    self.scan_layers = config.scan_layers
    self.scan_unroll = config.scan_unroll
    self.remat_policy = config.remat_policy
    trunk.remat_policy(config.remat_policy)  # Fails before any parameter is created.
    embed_width = connections.layout(config.connection, d).embed_width
    self.embed = layers.Embed(config, rngs=rngs, width=embed_width)
    self.streams = connections.build_streams(config.connection, dim=d,
                                             norm_eps=config.norm_eps, rngs=rngs)
    self.blocks = trunk.create_blocks(config, rngs=rngs)
    self.final_norm = layers.model_norm(config, d)
    self.unembed = None if config.tie_embeddings else nnx.Param(
        layers.init_weight(config, rngs, (d, config.vocab_size), fan_in=d),
        out_sharding=('embed', 'vocab'))
    self.dtype = layers.dtype_of(config.dtype)
    self.stream_dtype = layers.dtype_of(config.stream_dtype)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """int tokens [B, L] -> float32 logits [B, L, V]."""
    return self.forward(tokens_BxL).logits

  def forward(self, tokens_BxL: jax.Array, *, return_hidden: bool = False) -> trunk.ModelOutput:
    """int tokens [B, L] -> ModelOutput (logits [B, L, V], hidden if return_hidden, MoE aux)."""
    return self.forward_embeddings(self.embed(tokens_BxL), return_hidden=return_hidden)

  def forward_embeddings(self, h_BxLxE: jax.Array, *,
                         return_hidden: bool = False) -> trunk.ModelOutput:
    """Same as forward but starting from the token embeddings [B, L, E]."""
    # The streams (residual) stay in stream_dtype; every branch computes in self.dtype.
    x_BxLxNxD = sharding.constrain(self.streams.expand(h_BxLxE.astype(self.stream_dtype)),
                                   trunk.STREAMS_AXES)
    x_BxLxNxD, hidden, aux = trunk.run_blocks(self.blocks, x_BxLxNxD, num_layers=self.num_layers,
                                              scan_layers=self.scan_layers,
                                              unroll=self.scan_unroll,
                                              policy_name=self.remat_policy,
                                              return_hidden=return_hidden)
    h_BxLxD = self.final_norm(self.streams.reduce(x_BxLxNxD))
    if self.unembed is None:
      logits_BxLxV = self.embed.attend(h_BxLxD)
    else:
      logits_BxLxV = layers.project(h_BxLxD.astype(self.dtype),
                                    self.unembed[...].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
    logits_BxLxV = sharding.constrain(logits_BxLxV, LOGITS_AXES)
    return trunk.ModelOutput(logits_BxLxV, hidden, aux)
