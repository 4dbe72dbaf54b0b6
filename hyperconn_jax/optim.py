"""Optimizer, learning-rate schedules, losses and gradient accumulation (config.optim).

Everything works on *pure* parameter pytrees (an `nnx.State` of arrays, as `nnx.as_pure` gives it);
the weight-decay mask is computed once from the typed state, where each leaf is still an
`nnx.Variable` subclass from hyperconn_jax/params.py, so decay is decided by parameter kind and
never by path.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import optax

from hyperconn_jax import config_lib
from hyperconn_jax import params as params_lib

PyTree = Any


def decay_mask(typed_params: nnx.State, decay_embeddings: bool) -> PyTree:
  """Which parameters get weight decay.

  Args:
    typed_params: the parameters as an `nnx.State` whose leaves are `nnx.Variable`s (e.g. from
      `nnx.split(model, nnx.Param, ...)` or an abstract state).
    decay_embeddings: config.optim.decay_embeddings.

  Returns:
    A pytree with the structure of the pure parameters (`nnx.as_pure(typed_params)`) and a Python
    bool per parameter: False for `params.no_decay_types(decay_embeddings)` (norm scales, static HC
    coefficients, embeddings unless decayed), True for the rest (projection kernels, dynamic HC weights).
  """
  no_decay = params_lib.no_decay_types(decay_embeddings)
  return jax.tree.map(lambda v: not isinstance(v, no_decay), typed_params,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_schedule(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning rate as a function of the number of updates already done (0-based step).

  Warmup (all schedules): lr * (step + 1) / warmup_steps for step < warmup_steps, so the first
  update already moves and the peak lr is used from update warmup_steps - 1 on.
  After warmup:
    'cosine'   lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (num_steps - warmup),
               lr_min = lr * final_lr_frac; it reaches lr_min at step == num_steps (after the last update).
    'constant' lr.
    'step'     lr * step_factors[i] for the last i with step >= step_fracs[i] * num_steps, else lr
               (mHC / DeepSeek: factors are relative to the peak lr, not cumulative).

  Args:
    optim_config: config.optim.
    num_steps: config.train.num_steps.

  Returns:
    An optax schedule (step -> float32 lr), usable under jit.
  """
  lr = optim_config.lr
  warmup = optim_config.warmup_steps
  kind = optim_config.schedule
  if kind not in ('cosine', 'constant', 'step'):
    raise ValueError(f"optim.schedule={kind!r}; allowed: 'cosine', 'constant', 'step'.")
  final = lr * optim_config.final_lr_frac
  boundaries = [frac * num_steps for frac in optim_config.step_fracs]
  factors = list(optim_config.step_factors)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == 'cosine':
      progress = jnp.clip((step - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
      after = final + (lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == 'constant':
      after = jnp.asarray(lr, jnp.float32)
    else:
      factor = jnp.asarray(1.0, jnp.float32)
      for boundary, f in zip(boundaries, factors):
        factor = jnp.where(step >= boundary, f, factor)
      after = lr * factor
    if warmup > 0:
      return jnp.where(step < warmup, lr * (step + 1.0) / warmup, after)
    return after

  return schedule


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` whose floating-point state is stored in `dtype` between steps and computed in
  float32 (e.g. Adam moments in bfloat16: half their memory; the update math stays float32)."""
  def cast(tree, to):
    return jax.tree.map(
        lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config: ml_collections.ConfigDict, num_steps: int,
                   mask: PyTree) -> optax.GradientTransformation:
  """Global-norm clipping (skipped if grad_clip == 0) followed by AdamW with masked decay.

  Args:
    optim_config: config.optim (b1, b2, eps, weight_decay, grad_clip, moment_dtype and the
      schedule fields).
    num_steps: config.train.num_steps (for the schedule).
    mask: `decay_mask(...)` of the parameters this optimizer will update.

  Returns:
    An optax transformation over pure parameter pytrees. Decay is decoupled and scaled by the
    learning rate (p <- p - lr * (adam_update + weight_decay * p)), as torch.optim.AdamW (and
    optax.adamw). The Adam moments are kept in optim.moment_dtype; the parameters keep theirs
    (model.param_dtype: float32 master weights).
  """
  if optim_config.moment_dtype not in config_lib.MOMENT_DTYPES:
    raise ValueError(f'optim.moment_dtype must be one of {config_lib.MOMENT_DTYPES}, got '
                     f'{optim_config.moment_dtype!r}')
  adam = optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
  if optim_config.moment_dtype != 'float32':
    adam = stored_in(adam, jnp.dtype(optim_config.moment_dtype))
  adamw = optax.chain(adam, optax.add_decayed_weights(optim_config.weight_decay, mask),
                      optax.scale_by_learning_rate(make_schedule(optim_config, num_steps)))
  if optim_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adamw)
  return adamw


def accumulated_grads(sums_fn: Callable[[PyTree, dict], dict[str, jax.Array]], params: PyTree,
                      batch: dict[str, jax.Array], num_microbatches: int
                      ) -> tuple[dict[str, jax.Array], PyTree]:
  """Loss sums and gradients of the summed objective, over microbatches of one global batch.

  The batch [B, ...] is split into num_microbatches strided microbatches (microbatch i holds rows
  i, i + k, i + 2k, ...: with B sharded over devices, every device keeps working on its own rows),
  run one after the other with a lax.scan. Since `sums_fn` returns sums and the caller divides
  by the total weight of the whole batch, the result equals the big-batch gradient up to float
  summation order; only one microbatch's activations are alive at a time.

  Args:
    sums_fn: (params, batch) -> dict of scalar sums, including 'objective' (differentiated).
    params: pure parameters.
    batch: dict of arrays with a leading batch axis B divisible by num_microbatches.
    num_microbatches: config.optim.grad_accum_steps (1: no scan).

  Returns:
    (sums over the batch, gradient of the summed objective w.r.t. params).
  """
  def one(b):
    def objective(p):
      sums = sums_fn(p, b)
      return sums['objective'], sums
    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return sums, grads

  if num_microbatches == 1:
    return one(batch)

  def split(x):
    b = x.shape[0]
    return x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)

  micro = jax.tree.map(split, batch)
  shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, b):
    out = one(b)
    return jax.tree.map(jnp.add, carry, out), None

  total, _ = jax.lax.scan(body, init, micro)
  return total
