"""Evaluation on the validation split: for language models loss, perplexity, bits per byte;
for classifiers (tasks.py) loss and top-1 accuracy.

Bits per byte = (summed cross-entropy in nats) / (UTF-8 bytes of the target tokens) / ln 2; the
bytes come from the tokenizer's `token_bytes` table, so the number is comparable across tokenizers.
Weighted sums are accumulated on device over all batches and fetched once at the end.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hyperconn_jax import data
from hyperconn_jax import tasks

PyTree = Any
KEYS = ('eval_loss', 'eval_ppl', 'eval_bits_per_byte', 'eval_tokens')


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's rows of a batch into global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


class Evaluator:
  """Evaluates model states of one architecture on one mesh; the eval step is compiled once."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               model_shardings: PyTree, batch_sharding: NamedSharding):
    """Builds the jitted eval step.

    Args:
      config: the full config (data, model.dtype, train.eval_batches, the eval batch size
        config_lib.eval_batch_size: evaluation runs in its own batches, whatever the training
        batch and its gradient accumulation).
      graphdef: the model's graphdef (from nnx.split(model, nnx.Param, ...)).
      model_shardings: shardings of {'params': ..., 'rest': ...}.
      batch_sharding: sharding of [B, L] batches.
    """
    self._config = config
    self._task = tasks.of(config.model)
    self._batch_sharding = batch_sharding
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    self._token_bytes = jax.device_put(
        np.asarray(data.get_tokenizer(config.data).token_bytes, np.float32), replicated)

    def eval_step(model, batch, token_bytes, sums):
      net = nnx.merge(graphdef, model['params'], model['rest'])
      return jax.tree.map(jnp.add, sums, self._task.eval_sums(net, batch, token_bytes))

    batch_shardings = {k: batch_sharding for k in ('inputs', 'targets', 'weights')}
    self._step = jax.jit(eval_step,
                         in_shardings=(model_shardings, batch_shardings, replicated, replicated),
                         out_shardings=replicated, donate_argnums=(3,))
    self._replicated = replicated

  def __call__(self, model: PyTree, num_batches: int | None = None) -> dict[str, float]:
    """Evaluates {'params', 'rest'} on the validation split.

    Args:
      model: pure model state on the shardings given at construction.
      num_batches: batches to use (default config.train.eval_batches; <= 0: the whole split).

    Returns:
      The task's results (tasks.py): for LMs {'eval_loss': nats per token, 'eval_ppl':
      exp(eval_loss), 'eval_bits_per_byte': ..., 'eval_tokens': number of (weighted) target
      tokens}; for classifiers {'eval_loss', 'eval_accuracy', 'eval_examples'}.
    """
    num_batches = self._config.train.eval_batches if num_batches is None else num_batches
    sums = jax.device_put({k: np.zeros((), np.float32) for k in self._task.eval_sum_keys},
                          self._replicated)
    batches = data.make_eval_iterator(self._config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), num_batches=num_batches)
    for local in batches:
      sums = self._step(model, global_batch(local, self._batch_sharding), self._token_bytes, sums)
    sums = jax.device_get(sums)
    if float(sums['weight']) == 0:
      raise ValueError(f'the eval split {self._config.data.eval_split!r} gave no tokens')
    return self._task.results(sums)
