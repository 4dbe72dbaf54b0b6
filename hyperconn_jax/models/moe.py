"""Mixture-of-experts FFN in the OLMoE style: a softmax top-k router over SwiGLU experts.

  y_BxLxD -> router logits (float32) -> softmax probs_TxE -> top-k (weights_TxK, experts_TxK)
  -> out_t = sum_k weights_tk * Expert_{experts_tk}(y_t)

Each expert is a SwiGLU MLP of hidden size config.mlp_dim; OLMoE keeps the raw softmax weights
(no renormalisation over the top k) and has no shared expert. Two dispatches
(config.moe.capacity_factor):
- dropless (0): the T * k assignments are sorted by expert and run as grouped matmuls
  (jax.lax.ragged_dot); nothing is dropped (OLMoE / megablocks' dMoE).
- capacity (> 0): each expert has C = ceil(capacity_factor * T * k / E) slots for the batch;
  assignments are placed by priority (all first choices before any second choice, then by token
  order) into an [E, C, D] buffer, experts run as one batched einsum, and assignments beyond C are
  dropped (their weight is lost; the connection's residual path still carries the token).

The expert weights carry the logical axis 'expert' (config.mesh.rules maps it). Auxiliary outputs
of one layer (`aux`, float32): load_balance_loss = E * sum_e f_e * P_e (f_e: fraction of the T * k
assignments routed to e, P_e: mean router probability of e; 1 when perfectly balanced),
router_z_loss = mean_t logsumexp(logits_t)^2, expert_load = f [E], dropped_fraction (capacity
dispatch; 0 when dropless). `config` below is `config.model` (see configs/base.py).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hyperconn_jax import sharding
from hyperconn_jax.models import layers


def validate(config) -> None:
  """Raises ValueError naming the model.moe field, the bad value and what is allowed."""
  m = config.moe

  def check(ok, field, allowed):
    if not ok:
      raise ValueError(f'model.moe.{field} must be {allowed}, got {m[field]!r}')

  def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)

  def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)

  check(is_int(m.num_experts) and m.num_experts >= 1, 'num_experts', 'a positive integer')
  check(is_int(m.top_k) and 1 <= m.top_k <= m.num_experts, 'top_k',
        f'an integer in [1, model.moe.num_experts={m.num_experts}]')
  check(isinstance(m.renormalize, bool), 'renormalize', 'True or False')
  check(is_number(m.capacity_factor) and m.capacity_factor >= 0, 'capacity_factor',
        '>= 0 (0: dropless)')
  for field in ('load_balance_weight', 'router_z_weight'):
    check(is_number(m[field]) and m[field] >= 0, field, '>= 0')


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert of the capacity dispatch: ceil(capacity_factor * T * k / E)."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route(logits_TxE: jax.Array, top_k: int, renormalize: bool):
  """Top-k softmax routing and its auxiliary losses.

  Args:
    logits_TxE: router logits (float32).
    top_k: experts per token.
    renormalize: divide the top-k probabilities by their sum.

  Returns:
    (weights_TxK float32, experts_TxK int32, aux): aux has load_balance_loss, router_z_loss and
    expert_load [E] (see the module docstring).
  """
  num_tokens, num_experts = logits_TxE.shape
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  weights_TxK, experts_TxK = jax.lax.top_k(probs_TxE, top_k)
  if renormalize:
    weights_TxK = weights_TxK / jnp.sum(weights_TxK, axis=-1, keepdims=True)
  assigned_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32), axis=1)
  load_E = jnp.sum(assigned_TxE, axis=0) / (num_tokens * top_k)
  aux = {
      'load_balance_loss': num_experts * jnp.sum(load_E * jnp.mean(probs_TxE, axis=0)),
      'router_z_loss': jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1))),
      'expert_load': load_E,
  }
  return weights_TxK, experts_TxK.astype(jnp.int32), aux


class MoE(nnx.Module):
  """The MoE FFN sub-layer: y_BxLxD -> (out_BxLxD, aux); see the module docstring."""

  def __init__(self, config, *, out_init_multiplier: float, rngs: nnx.Rngs):
    d, f, e = config.d_model, config.mlp_dim, config.moe.num_experts
    self.dtype = layers.dtype_of(config.dtype)
    self.num_experts = e
    self.top_k = config.moe.top_k
    self.renormalize = config.moe.renormalize
    self.capacity_factor = config.moe.capacity_factor

    def init(shape, fan_in, multiplier=1.0):
      return layers.init_weight(config, rngs, shape, fan_in=fan_in, multiplier=multiplier)

    self.router = nnx.Param(init((d, e), d), out_sharding=('embed', None))
    self.gate = nnx.Param(init((e, d, f), d), out_sharding=('expert', 'embed', 'mlp'))
    self.up = nnx.Param(init((e, d, f), d), out_sharding=('expert', 'embed', 'mlp'))
    self.down = nnx.Param(init((e, f, d), f, out_init_multiplier),
                          out_sharding=('expert', 'mlp', 'embed'))

  def __call__(self, y_BxLxD: jax.Array):
    batch, length, d = y_BxLxD.shape
    y_TxD = y_BxLxD.reshape(batch * length, d).astype(self.dtype)
    logits_TxE = jnp.einsum('td,de->te', y_TxD, self.router[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
    weights_TxK, experts_TxK, aux = route(logits_TxE, self.top_k, self.renormalize)
    if self.capacity_factor > 0:
      out_TxD, dropped = self._capacity_dispatch(y_TxD, weights_TxK, experts_TxK)
    else:
      out_TxD, dropped = self._dropless_dispatch(y_TxD, weights_TxK, experts_TxK)
    aux['dropped_fraction'] = dropped
    return out_TxD.reshape(batch, length, d), aux

  def _experts_grouped(self, x_AxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """SwiGLU of each row with its expert; rows sorted by expert, group_sizes_E rows each."""
    def dot(x, w):
      return jax.lax.ragged_dot(x, w[...].astype(self.dtype), group_sizes_E)
    return dot(jax.nn.silu(dot(x_AxD, self.gate)) * dot(x_AxD, self.up), self.down)

  def _dropless_dispatch(self, y_TxD, weights_TxK, experts_TxK):
    num_tokens, k = experts_TxK.shape
    num_experts = self.num_experts
    expert_A = experts_TxK.reshape(-1)  # A = T * k assignments, token-major.
    order_A = jnp.argsort(expert_A, stable=True)
    x_AxD = y_TxD[order_A // k]
    group_sizes_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    out_AxD = self._experts_grouped(x_AxD, group_sizes_E)
    out_TxKxD = out_AxD[jnp.argsort(order_A)].reshape(num_tokens, k, -1)
    out_TxD = jnp.einsum('tkd,tk->td', out_TxKxD, weights_TxK.astype(self.dtype))
    return out_TxD, jnp.zeros((), jnp.float32)

  def _capacity_dispatch(self, y_TxD, weights_TxK, experts_TxK):
    num_tokens, k = experts_TxK.shape
    num_experts = self.num_experts
    slots = capacity(num_tokens, k, num_experts, self.capacity_factor)
    # Assignments in priority order: choice-major (all first choices first), then token order.
    expert_A = experts_TxK.T.reshape(-1)
    onehot_AxE = jax.nn.one_hot(expert_A, num_experts, dtype=jnp.int32)
    position_A = jnp.sum(jnp.cumsum(onehot_AxE, axis=0) * onehot_AxE, axis=-1) - 1
    keep_A = position_A < slots
    # Dropped assignments point one past the buffer: scatter ignores them, gather gives 0.
    slot_A = jnp.where(keep_A, expert_A * slots + position_A, num_experts * slots)
    token_A = jnp.tile(jnp.arange(num_tokens), k)
    buffer_ExCxD = jnp.zeros((num_experts * slots, y_TxD.shape[-1]), self.dtype).at[slot_A].set(
        y_TxD[token_A], mode='drop').reshape(num_experts, slots, -1)
    buffer_ExCxD = sharding.constrain(buffer_ExCxD, ('expert', None, None))

    def dot(x, w, spec):
      return jnp.einsum(spec, x, w[...].astype(self.dtype))
    hidden_ExCxF = (jax.nn.silu(dot(buffer_ExCxD, self.gate, 'ecd,edf->ecf'))
                    * dot(buffer_ExCxD, self.up, 'ecd,edf->ecf'))
    out_ExCxD = dot(hidden_ExCxF, self.down, 'ecf,efd->ecd')
    out_AxD = out_ExCxD.reshape(num_experts * slots, -1).at[slot_A].get(mode='fill',
                                                                          fill_value=0)
    weights_A = (weights_TxK.T.reshape(-1) * keep_A).astype(self.dtype)
    out_TxD = jnp.sum((out_AxD * weights_A[:, None]).reshape(k, num_tokens, -1), axis=0)
    return out_TxD, 1.0 - jnp.mean(keep_A.astype(jnp.float32))
