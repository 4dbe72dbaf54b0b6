"""MoE decoder in the OLMoE style (model.ffn='moe') with any connection.

  python train.py --config=configs/moe.py:connection=hc,n=4,size=cpu --workdir=workdirs/moe_dhc4
  python train.py --config=configs/moe.py:connection=residual,size=cpu --workdir=workdirs/moe_pre
  python train.py --config=configs/moe.py:connection=hc,n=4,size=olmoe_1b_7b --workdir=DIR  # pod

Arguments (after ':', comma-separated key=value):
  connection  residual (= residual_prenorm) | any registered kind: residual_prenorm |
              residual_postnorm | hc | mhc | frac | resi_dual | altup | vwn (see configs/lm.py)
  n, m        HC / mHC expansion rate, Frac-Connections frac-rate
  dynamic     static (SHC / SFC) or dynamic (DHC / DFC) coefficients (tanh follows dynamic)
  size        tiny | cpu | olmoe_1b_7b  (model shape and matching training setup)
  capacity_factor  'size' (the size's default: dropless for olmoe_1b_7b; 2 for tiny / cpu, whose
              grouped matmuls are slow on CPU), 0 (dropless) or a capacity factor > 0
Leaves can still be overridden: --config.model.moe.top_k=4 --config.optim.lr=1e-3 ...
"""

from configs import base
from configs import lm
from hyperconn_jax import config_lib
from hyperconn_jax.models import sizes

def _cpu(c):
  """The LM's CPU setup with 8 experts, top-2: minutes on a 2-core CPU."""
  lm.cpu(c)
  c.model.mlp_dim = 256
  c.model.moe.update(dict(num_experts=8, top_k=2, capacity_factor=2.0))


def _tiny(c):
  """The LM's seconds-long setup with 4 experts, top-2."""
  lm.tiny(c)
  c.model.mlp_dim = 32
  c.model.moe.update(dict(num_experts=4, top_k=2, capacity_factor=2.0))


def _olmoe(c):
  """OLMoE-1B-7B (OLMoE paper): 4096-token sequences, 1024 per batch (4M tokens), AdamW lr 4e-4
  (0.9, 0.95, wd 0.1), 2500 warmup steps, cosine to 10%; 500B tokens as in the HC paper.

  Trains on token shards made with the GPT-NeoX-20B tokenizer.json (OLMoE's), as configs/lm.py's
  OLMo sizes: --config.data.data_dir=SHARDS --config.data.tokenizer_path=FILE.
  """
  sizes.apply_size(c.model, 'olmoe_1b_7b')
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'dots_no_batch'
  c.data.update(dict(dataset='tokens', tokenizer='huggingface', seq_len=4096))
  c.optim.update(dict(lr=4e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, schedule='cosine',
                      warmup_steps=2500, final_lr_frac=0.1, grad_clip=1.0))
  # 500B tokens at 1024 x 4096 tokens per step.
  c.train.update(dict(batch_size=1024, num_steps=119_209, log_every=50, eval_every=2000,
                      eval_batches=100, checkpoint_every=1000))


_SIZES = {'tiny': _tiny, 'cpu': _cpu, 'olmoe_1b_7b': _olmoe}


def get_config(arg=None):
  """Returns the config for the switches in `arg` (see the module docstring)."""
  a = config_lib.parse_arg(arg, connection='hc', n=4, m=4, dynamic=True, size='cpu',
                           capacity_factor='size')
  if a.size not in _SIZES:
    raise ValueError(f'config argument size={a.size!r} must be one of {tuple(_SIZES)}')
  c = base.get_config()
  c.model.ffn = 'moe'
  _SIZES[a.size](c)
  if a.capacity_factor != 'size':
    try:
      c.model.moe.capacity_factor = float(a.capacity_factor)
    except ValueError:
      raise ValueError(f"config argument capacity_factor={a.capacity_factor!r} must be 'size' or "
                       'a number >= 0') from None
  lm.set_connection(c, a.connection, n=a.n, m=a.m, dynamic=a.dynamic, tanh=a.dynamic)
  c.lock()
  return c
