"""Model FLOPs of a train step: the one formula the step logs (MFU), benchmarks/ and the
ahead-of-time pod check (hyperconn_jax.aot) share."""

from hyperconn_jax import connections


def model_flops_per_step(config) -> float:
  """Matmul FLOPs of one train step (3x the forward: PaLM's convention; attention counted whole,
  not halved for causality), connections included (each kind's `extra_flops`).

  Args:
    config: the full config (model shape, data.seq_len, train.batch_size).
  """
  m = config.model
  d, h, k, f, v = m.d_model, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size
  seq = config.data.seq_len
  extra = connections.extra_flops(m.connection, d)
  per_layer = (2 * d * 3 * h * k + 2 * h * k * d + 4 * seq * h * k + 6 * d * f
               + 2 * extra.per_sublayer)
  forward_per_token = m.num_layers * per_layer + 2 * d * v + extra.per_token
  return 3.0 * forward_per_token * seq * config.train.batch_size
