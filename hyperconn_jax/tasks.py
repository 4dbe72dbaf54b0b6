"""Losses and metrics per task; the task follows from config.model.name (models.task).

  'lm'              batches {'inputs' int32 [B, L], 'targets' int32 [B, L], 'weights' [B, L]};
                    next-token cross-entropy per weighted token.
  'classification'  batches {'inputs' float32 images [B, H, W, C], 'targets' float32 label
                    distributions [B, num_classes] (one-hot, or mixed by mixup), 'weights' [B]};
                    cross-entropy against the distribution and top-1 accuracy (argmax of the
                    logits == argmax of the targets) per weighted example.

Everything is a weighted *sum* over the batch (microbatches and data shards add up exactly); the
caller divides by the summed weight. An MoE model (model.ffn='moe') adds its auxiliary losses,
weighted by model.moe.load_balance_weight / router_z_weight, to the objective of either task.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from hyperconn_jax import models
from hyperconn_jax import optim
from hyperconn_jax import sharding

PyTree = Any
# MoE auxiliary scalars, reported as train metrics 'moe_<name>'.
MOE_SCALARS = ('load_balance_loss', 'router_z_loss', 'dropped_fraction')


def batch_sharding(config, mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of the batch arrays: the leading (batch) axis over the 'batch' mesh axes."""
  if models.task(config.model) == 'lm':
    return sharding.batch_sharding(mesh, rules)
  return NamedSharding(mesh, sharding.logical_to_spec(('batch',), None, mesh, rules))


def _classification_sums(logits_BxC, targets_BxC, weights_B, z_loss: float):
  logits_BxC = logits_BxC.astype(jnp.float32)
  lse_B = jax.nn.logsumexp(logits_BxC, axis=-1)
  ce_B = lse_B - jnp.sum(targets_BxC * logits_BxC, axis=-1) / jnp.maximum(
      jnp.sum(targets_BxC, axis=-1), 1e-9)
  correct_B = jnp.argmax(logits_BxC, axis=-1) == jnp.argmax(targets_BxC, axis=-1)
  ce, z = jnp.sum(weights_B * ce_B), jnp.sum(weights_B * jnp.square(lse_B))
  return {'ce': ce, 'z': z, 'weight': jnp.sum(weights_B),
          'correct': jnp.sum(weights_B * correct_B),
          'objective': ce + z_loss * z if z_loss else ce}


def loss_sums(config, net, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None
              ) -> dict[str, jax.Array]:
  """Weighted loss sums of one (micro)batch for the training objective.

  Args:
    config: the full config.
    net: the model (nnx module).
    batch: see the module docstring.
    dropout_key: used by models with dropout (ViT with model.vit.dropout > 0).

  Returns:
    {'ce', 'z', 'weight', 'objective'} (+ 'correct' for classification; + 'moe_<name>' weighted
    sums of the MoE auxiliaries and 'moe_expert_load' [E] for MoE models).
  """
  if models.task(config.model) == 'lm':
    logits, aux = net(batch['inputs'], return_aux=True)
    sums = optim.lm_loss_sums(logits, batch['targets'], batch['weights'], config.optim.z_loss)
  else:
    use_dropout = dropout_key is not None and config.model.vit.dropout > 0
    logits, aux = net(batch['inputs'], return_aux=True,
                      dropout_key=dropout_key if use_dropout else None)
    sums = _classification_sums(logits, batch['targets'], batch['weights'], config.optim.z_loss)
  if aux:
    moe = config.model.moe
    weight = sums['weight']
    sums['objective'] = sums['objective'] + weight * (
        moe.load_balance_weight * aux['load_balance_loss']
        + moe.router_z_weight * aux['router_z_loss'])
    for name in MOE_SCALARS:
      sums[f'moe_{name}'] = weight * aux[name]
    sums['moe_expert_load'] = weight * aux['expert_load']
  return sums


def train_metrics(sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
  """Scalar training metrics from the loss sums of a batch (denom: the summed weight, >= 1).

  loss, z_loss (unscaled), tokens (summed weight: tokens or examples); classification: accuracy;
  MoE: moe_load_balance_loss, moe_router_z_loss, moe_dropped_fraction (layer means),
  moe_max_load (E * the largest expert's share of the assignments: 1 when balanced) and
  moe_load/eNN (each expert's share of the assignments, averaged over layers).
  """
  metrics = {'loss': sums['ce'] / denom, 'z_loss': sums['z'] / denom, 'tokens': sums['weight']}
  if 'correct' in sums:
    metrics['accuracy'] = sums['correct'] / denom
  if 'moe_expert_load' in sums:
    for name in MOE_SCALARS:
      metrics[f'moe_{name}'] = sums[f'moe_{name}'] / denom
    load_E = sums['moe_expert_load'] / denom
    metrics['moe_max_load'] = load_E.shape[0] * jnp.max(load_E)
    for e in range(load_E.shape[0]):
      metrics[f'moe_load/e{e:02d}'] = load_E[e]
  return metrics


def eval_sum_keys(config) -> tuple[str, ...]:
  """The sums eval_sums returns, for zero-initialising the accumulator."""
  if models.task(config.model) == 'lm':
    return ('ce', 'weight', 'bytes')
  return ('ce', 'weight', 'correct')


def eval_sums(config, net, batch: dict[str, jax.Array], token_bytes: jax.Array
              ) -> dict[str, jax.Array]:
  """Weighted sums of one eval batch (see eval_sum_keys); token_bytes: the UTF-8 length of each
  token id (LM bits per byte)."""
  if models.task(config.model) == 'lm':
    logits_BxLxV = net(batch['inputs'])
    loss = optim.lm_loss_sums(logits_BxLxV, batch['targets'], batch['weights'], 0.0)
    bytes_BxL = token_bytes[batch['targets']] * batch['weights']
    return {'ce': loss['ce'], 'weight': loss['weight'], 'bytes': jnp.sum(bytes_BxL)}
  sums = _classification_sums(net(batch['inputs']), batch['targets'], batch['weights'], 0.0)
  return {k: sums[k] for k in ('ce', 'weight', 'correct')}


def classification_results(sums: dict[str, float]) -> dict[str, float]:
  """{'eval_loss', 'eval_accuracy' (top-1), 'eval_examples'} from summed eval_sums."""
  examples = float(sums['weight'])
  return {'eval_loss': float(sums['ce']) / examples,
          'eval_accuracy': float(sums['correct']) / examples, 'eval_examples': examples}
