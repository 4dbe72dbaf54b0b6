"""Tasks: what a model's batches hold, its loss, its eval sums and results, in one object per task.

The task follows from config.model.name (`of`): a decoder LM does 'lm', a ViT 'classification'.

  LM              batches {'inputs' int32 [B, L], 'targets' int32 [B, L], 'weights' [B, L]};
                  next-token cross-entropy per weighted token; eval: loss, perplexity, bits per
                  byte.
  CLASSIFICATION  batches {'inputs' float32 images [B, H, W, C], 'targets' float32 label
                  distributions [B, num_classes] (one-hot, or mixed by mixup), 'weights' [B]};
                  cross-entropy against the distribution and top-1 accuracy (argmax of the
                  logits == argmax of the targets) per weighted example.

Everything is a weighted *sum* over the batch (microbatches and data shards add up exactly); the
caller divides by the summed weight. An MoE model (model.ffn='moe') adds its auxiliary losses,
weighted by model.moe.load_balance_weight / router_z_weight, to the objective of either task.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from hyperconn_jax import sharding

PyTree = Any
# MoE auxiliary scalars, reported as train metrics 'moe_<name>'.
MOE_SCALARS = ('load_balance_loss', 'router_z_loss', 'dropped_fraction')


def lm_loss_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                 z_loss: float) -> dict[str, jax.Array]:
  """Weighted sums of the language-model losses of one batch (float32).

  Args:
    logits_BxLxV: logits (any float dtype; computed in float32).
    targets_BxL: int32 next-token ids.
    weights_BxL: float32 per-token weights (0 for padding).
    z_loss: coefficient of the z-loss term z_loss * logsumexp(logits)^2 (0 disables).

  Returns:
    {'ce': sum of w * cross-entropy, 'z': sum of w * logsumexp^2 (unscaled), 'weight': sum of w,
     'objective': ce + z_loss * z}.
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce = jnp.sum(weights_BxL * (lse_BxL - target_logit_BxL))
  z = jnp.sum(weights_BxL * jnp.square(lse_BxL))
  objective = ce + z_loss * z if z_loss else ce
  return {'ce': ce, 'z': z, 'weight': jnp.sum(weights_BxL), 'objective': objective}


def classification_loss_sums(logits_BxC, targets_BxC, weights_B, z_loss: float):
  """As lm_loss_sums, per example against a label distribution, plus 'correct' (top-1)."""
  logits_BxC = logits_BxC.astype(jnp.float32)
  lse_B = jax.nn.logsumexp(logits_BxC, axis=-1)
  ce_B = lse_B - jnp.sum(targets_BxC * logits_BxC, axis=-1) / jnp.maximum(
      jnp.sum(targets_BxC, axis=-1), 1e-9)
  correct_B = jnp.argmax(logits_BxC, axis=-1) == jnp.argmax(targets_BxC, axis=-1)
  ce, z = jnp.sum(weights_B * ce_B), jnp.sum(weights_B * jnp.square(lse_B))
  return {'ce': ce, 'z': z, 'weight': jnp.sum(weights_B),
          'correct': jnp.sum(weights_B * correct_B),
          'objective': ce + z_loss * z if z_loss else ce}


class LanguageModeling:
  """Next-token prediction (decoder LMs)."""

  name = 'lm'
  reads_images = False
  eval_sum_keys = ('ce', 'weight', 'bytes')

  def batch_sharding(self, mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    return sharding.batch_sharding(mesh, rules)

  def batch_shapes(self, config, rows: int) -> dict:
    """{field: (shape, dtype)} of a batch of `rows` packed sequences."""
    shape = (rows, config.data.seq_len)
    return {'inputs': (shape, jnp.int32), 'targets': (shape, jnp.int32),
            'weights': (shape, jnp.float32)}

  def forward(self, config, net, inputs, dropout_key):
    del config, dropout_key  # The decoder has no dropout.
    return net.forward(inputs)

  def loss_sums(self, logits, batch, z_loss: float):
    return lm_loss_sums(logits, batch['targets'], batch['weights'], z_loss)

  def eval_sums(self, net, batch, token_bytes):
    loss = lm_loss_sums(net(batch['inputs']), batch['targets'], batch['weights'], 0.0)
    bytes_BxL = token_bytes[batch['targets']] * batch['weights']
    return {'ce': loss['ce'], 'weight': loss['weight'], 'bytes': jnp.sum(bytes_BxL)}

  def results(self, sums: dict[str, float]) -> dict[str, float]:
    """{'eval_loss': nats per token, 'eval_ppl', 'eval_bits_per_byte', 'eval_tokens'}."""
    tokens = float(sums['weight'])
    loss = float(sums['ce']) / tokens
    return {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 700.0)),
            'eval_bits_per_byte': float(sums['ce']) / max(float(sums['bytes']), 1.0) / math.log(2),
            'eval_tokens': tokens}


class Classification:
  """Image classification (ViT): one label distribution per example."""

  name = 'classification'
  reads_images = True
  eval_sum_keys = ('ce', 'weight', 'correct')

  def batch_sharding(self, mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(('batch',), None, mesh, rules))

  def batch_shapes(self, config, rows: int) -> dict:
    """{field: (shape, dtype)} of a batch of `rows` images with label distributions."""
    v = config.model.vit
    return {'inputs': ((rows, v.image_size, v.image_size, v.channels), jnp.float32),
            'targets': ((rows, v.num_classes), jnp.float32), 'weights': ((rows,), jnp.float32)}

  def forward(self, config, net, inputs, dropout_key):
    use_dropout = dropout_key is not None and config.model.vit.dropout > 0
    return net.forward(inputs, dropout_key=dropout_key if use_dropout else None)

  def loss_sums(self, logits, batch, z_loss: float):
    return classification_loss_sums(logits, batch['targets'], batch['weights'], z_loss)

  def eval_sums(self, net, batch, token_bytes):
    del token_bytes
    sums = classification_loss_sums(net(batch['inputs']), batch['targets'], batch['weights'], 0.0)
    return {k: sums[k] for k in self.eval_sum_keys}

  def results(self, sums: dict[str, float]) -> dict[str, float]:
    """{'eval_loss', 'eval_accuracy' (top-1), 'eval_examples'}."""
    examples = float(sums['weight'])
    return {'eval_loss': float(sums['ce']) / examples,
            'eval_accuracy': float(sums['correct']) / examples, 'eval_examples': examples}


LM, CLASSIFICATION = LanguageModeling(), Classification()
# config.model.name -> its task.
TASKS = {'decoder_lm': LM, 'vit': CLASSIFICATION}


def of(model_config):
  """The task of config.model (by model.name, which models.validate checks)."""
  return TASKS[model_config.name]


def batch_sharding(config, mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of the batch arrays: the leading (batch) axis over the 'batch' mesh axes."""
  return of(config.model).batch_sharding(mesh, rules)


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
  task = of(config.model)
  out = task.forward(config, net, batch['inputs'], dropout_key)
  sums, aux = task.loss_sums(out.logits, batch, config.optim.z_loss), out.aux
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
