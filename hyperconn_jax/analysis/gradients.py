"""Per-sub-layer gradient norms: the vanishing side of HC's seesaw (HC section 1).

The gradient of the mean validation loss (cross-entropy per weighted token or example, no z-loss)
on fixed batches, with respect to the model's parameters; its norm is taken over the weights of
each sub-layer's branch (attention or FFN, with its pre-norm scale if it has one) and, apart,
over the weights of each sub-layer's connection. Sub-layer k (1-based, as diagnostics) is the
attention of block (k - 1) // 2 for odd k and its FFN for even k.

  gradient_norms(model, config, batches)   a model in either layout (loop or scanned blocks)
  checkpoint_gradient_norms(workdir, ...)  at initialisation (rebuilt from the run's seed) and at
                                           each kept checkpoint of a run
"""

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from hyperconn_jax import checkpoint, models, rundir, sharding, tasks
from hyperconn_jax.analysis import loading

# Block attributes -> (offset of the sub-layer within its block, 'branch' or 'connection').
_PARTS = {'attn': (0, 'branch'), 'attn_norm': (0, 'branch'), 'attn_connection': (0, 'connection'),
          'mlp': (1, 'branch'), 'mlp_norm': (1, 'branch'), 'mlp_connection': (1, 'connection')}


def _grads_fn(graphdef, config):
  """A jitted (params, rest, batch) -> (gradient of the summed loss, summed loss, summed weight);
  params and rest: the nnx.Param and other states of a model of `graphdef`."""

  @jax.jit
  def ce_grads(params, rest, batch):
    def ce(params):
      sums = tasks.loss_sums(config, nnx.merge(graphdef, params, rest), batch)
      return sums['ce'], sums['weight']
    (total, weight), grads = jax.value_and_grad(ce, has_aux=True)(params)
    return grads, total, weight

  return ce_grads


def _norms(grads_fn, model, batches, num_layers: int) -> dict[str, Any]:
  """See gradient_norms."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  grads, total, weight = None, 0.0, 0.0
  for batch in batches:
    g, t, w = grads_fn(params, rest, {k: jnp.asarray(v) for k, v in batch.items()})
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    total, weight = total + float(t), weight + float(w)
  if grads is None:
    raise ValueError('no batches to take gradients on')
  sq = {'branch': np.zeros(2 * num_layers), 'connection': np.zeros(2 * num_layers)}
  whole = 0.0
  for path, leaf in nnx.to_flat_state(grads):
    g = np.asarray(leaf.get_value(), np.float64) / weight  # The gradient of the mean loss.
    whole += float(np.sum(g * g))
    if path[0] != 'blocks':
      continue
    if isinstance(path[1], int):  # Loop layout: blocks[i].<part>...
      offset, kind = _PARTS[path[2]]
      sq[kind][2 * path[1] + offset] += np.sum(g * g)
    else:  # Scanned: blocks.<part>... with the blocks on the leading axis.
      offset, kind = _PARTS[path[1]]
      sq[kind][offset::2] += np.sum(g * g, axis=tuple(range(1, g.ndim)))
  return {'layer': list(range(1, 2 * num_layers + 1)),
          'branch': np.sqrt(sq['branch']).tolist(),
          'connection': np.sqrt(sq['connection']).tolist(),
          'total': float(np.sqrt(whole)), 'loss': total / weight}


def gradient_norms(model, config, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Gradient norms per sub-layer of the mean loss over `batches` (see the module docstring).

  Args:
    model: a model of this library built from config.model (either layout).
    config: the full config (the task and its loss).
    batches: {'inputs', 'targets', 'weights'} batches (loading.validation_batches).

  Returns:
    {'layer': [1..K], 'branch': [K] norms, 'connection': [K] norms (0 where a connection has no
    weights), 'total': the norm of the whole gradient, 'loss': the mean loss}.
  """
  return _norms(_grads_fn(nnx.graphdef(model), config), model, batches, config.model.num_layers)


def checkpoint_gradient_norms(workdir: str, *, defaults, num_batches: int = 2,
                              steps: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
  """`gradient_norms` of a run at initialisation (step 0: the model its config.seed builds, as
  training starts) and at each of `steps` (default: every checkpoint the run kept), on the same
  `num_batches` validation batches; {step: result}. `defaults`: every config field's default
  (configs/base.py's get_config(); see rundir.load_run_config)."""
  config = loading.load_config(workdir, defaults)
  batches = loading.validation_batches(config, num_batches)
  if steps is None:
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
    try:
      steps = ckpt.all_steps()
    finally:
      ckpt.close()
  # build_model gives the values training starts from (models.create_model's docstring). Every
  # model in the training layout (scanned blocks compile once, not once per block).
  init = models.build_model(config.model, nnx.Rngs(config.seed))
  grads_fn = _grads_fn(nnx.graphdef(init), config)
  out = {0: _norms(grads_fn, init, batches, config.model.num_layers)}
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = sharding.logical_rules(config.mesh)
  for step in sorted(steps):
    graphdef, restored, _ = rundir.restore_model(workdir, config, step, mesh, rules)
    model = nnx.merge(graphdef, restored['params'], restored['rest'])
    out[step] = _norms(grads_fn, model, batches, config.model.num_layers)
  return out
