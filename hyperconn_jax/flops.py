"""Model FLOPs of a train step: the one formula the step logs (MFU), benchmarks/ and the
ahead-of-time pod check (hyperconn_jax.aot) share."""


def model_flops_per_step(config) -> float:
  """Matmul FLOPs of one train step (3x the forward: PaLM's convention; attention counted whole,
  not halved for causality), connections included."""
  m = config.model
  d, h, k, f, v = m.d_model, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size
  seq = config.data.seq_len
  conn = m.connection
  per_sublayer_conn = 0.0
  if conn.kind == 'hc':
    n = conn.n
    per_sublayer_conn = 2 * n * (n + 1) * d + (2 * n * d * (n + 2) if conn.dynamic else 0)
  elif conn.kind == 'mhc':
    n = conn.n
    per_sublayer_conn = 2 * n * (n + 1) * d + 2 * n * d * (n * n + 2 * n)
  elif conn.kind == 'frac':
    mm = conn.m
    per_sublayer_conn = 4 * mm * d + (2 * d * (2 * mm + 1) if conn.dynamic else 0)
  per_layer = (2 * d * 3 * h * k + 2 * h * k * d + 4 * seq * h * k + 6 * d * f
               + 2 * per_sublayer_conn)
  forward_per_token = m.num_layers * per_layer + 2 * d * v
  return 3.0 * forward_per_token * seq * config.train.batch_size
