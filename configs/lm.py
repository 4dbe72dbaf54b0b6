"""Decoder LM with any connection: the config for ablations.

  python train.py --config=configs/lm.py:connection=hc,n=4,dynamic=true,size=cpu --workdir=workdirs/dhc4
  python train.py --config=configs/lm.py:connection=residual,size=cpu --workdir=workdirs/prenorm
  python train.py --config=configs/lm.py:connection=mhc,n=4,size=cpu --workdir=workdirs/mhc4
  python train.py --config=configs/lm.py:connection=frac,m=4,size=cpu --workdir=workdirs/dfc4

Arguments (after ':', comma-separated key=value):
  connection  residual (= residual_prenorm) | any registered kind (hyperconn_jax.connections.KINDS):
              residual_prenorm | residual_postnorm | hc | mhc | frac | resi_dual | altup | vwn
              (resi_dual, altup: HC Table 4's related methods; vwn: Virtual Width Networks)
  n, m        HC / mHC expansion rate (AltUp: blocks), Frac-Connections frac-rate (VWN: n
              over-width segments, m backbone segments)
  dynamic     static (SHC / SFC) or dynamic (DHC / DFC) coefficients
  tanh        auto (= dynamic) | true | false  (HC Table 1 'W/O tanh')
  train_width, train_beta   HC Table 3 ablations (non-trainable width-connections / B)
  size        tiny | cpu | olmo_1b | olmo_7b  (model shape and matching training setup)
A switch sets the option of that name of the chosen kind (model.connection.<kind>.<switch>) and
is ignored by kinds without it. Leaves can still be overridden: --config.model.d_model=512
--config.model.connection.hc.index_base=1 --config.optim.lr=1e-3 ...
"""

from configs import base
from hyperconn_jax import config_lib
from hyperconn_jax.models import sizes

_CONNECTIONS = {'residual': 'residual_prenorm'}


def cpu(c):
  """A model a 2-core CPU trains in minutes on the embedded byte-level corpus."""
  c.model.update(dict(vocab_size=256, d_model=128, num_layers=4, num_heads=4, head_dim=32,
                      mlp_dim=512, tie_embeddings=True))
  c.data.seq_len = 128
  c.train.update(dict(batch_size=16, num_steps=300, log_every=10, eval_every=100,
                      eval_batches=10, checkpoint_every=100))
  c.optim.update(dict(lr=3e-3, warmup_steps=30))


def tiny(c):
  """Seconds-long runs for tests and smoke checks."""
  c.model.update(dict(vocab_size=256, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                      mlp_dim=64, tie_embeddings=True))
  c.data.seq_len = 32
  c.train.update(dict(batch_size=8, num_steps=40, log_every=5, eval_every=20, eval_batches=2,
                      checkpoint_every=20))
  c.optim.update(dict(lr=3e-3, warmup_steps=5))


def _olmo(c, name):
  """OLMo baseline setup (configs/official/OLMo-1B.yaml), which the HC paper keeps.

  Trains on token shards made with the GPT-NeoX-20B tokenizer (OLMo's and the paper's; the user
  provides its tokenizer.json): --config.data.data_dir=SHARDS --config.data.tokenizer_path=FILE,
  both may be gs:// paths (README, 'The paper's corpus'). model.vocab_size 50304 is OLMo's padded
  embedding size, >= the tokenizer's vocabulary (checked before compiling).
  """
  sizes.apply_size(c.model, name)
  # OLMo: mitchell init, bfloat16 compute over float32 weights and a float32 residual stream.
  c.model.update(dict(init='mitchell', dtype='bfloat16', param_dtype='float32',
                      stream_dtype='float32'))
  c.model.scan_layers = True
  c.model.remat_policy = 'dots_no_batch'
  c.data.update(dict(dataset='tokens', tokenizer='huggingface', seq_len=2048))
  c.optim.update(dict(lr=4e-4 if name == 'olmo_1b' else 3e-4, b1=0.9, b2=0.95, weight_decay=0.1,
                      schedule='cosine', warmup_steps=2000, final_lr_frac=0.1, grad_clip=1.0))
  # 500B tokens at 2048 x 2048 tokens per step (HC section 4).
  c.train.update(dict(batch_size=2048, num_steps=119_209, log_every=50, eval_every=2000,
                      eval_batches=100, checkpoint_every=1000))
  c.mesh.shape = (1, -1, 1)


_SIZES = {'tiny': tiny, 'cpu': cpu,
          'olmo_1b': lambda c: _olmo(c, 'olmo_1b'), 'olmo_7b': lambda c: _olmo(c, 'olmo_7b')}


def get_config(arg=None):
  """Returns the config for the ablation switches in `arg` (see the module docstring)."""
  a = config_lib.parse_arg(arg, connection='hc', n=4, m=4, dynamic=True, tanh='auto',
                           train_width=True, train_beta=True, size='cpu')
  if a.size not in _SIZES:
    raise ValueError(f'config argument size={a.size!r} must be one of {tuple(_SIZES)}')
  if a.tanh not in ('auto', 'true', 'false'):
    raise ValueError(f"config argument tanh={a.tanh!r} must be one of ('auto', 'true', 'false')")
  c = base.get_config()
  _SIZES[a.size](c)
  set_connection(c, a.connection, n=a.n, m=a.m, dynamic=a.dynamic,
                 tanh=a.dynamic if a.tanh == 'auto' else a.tanh == 'true',
                 train_width=a.train_width, train_beta=a.train_beta)
  c.lock()
  return c


def set_connection(c, connection: str, **switches) -> None:
  """Sets config.model.connection.kind ('residual' means residual_prenorm) and, of the switches,
  those that are options of that kind (model.connection.<kind>.<switch>)."""
  conn = c.model.connection
  conn.kind = _CONNECTIONS.get(connection, connection)
  if conn.kind not in conn or conn.kind == 'kind':
    raise ValueError(f'config argument connection={connection!r} must be one of '
                     f"{('residual',) + tuple(k for k in conn if k != 'kind')}")
  options = conn[conn.kind]
  options.update({k: v for k, v in switches.items() if k in options})
