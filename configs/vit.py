"""ViT classifier (model.name='vit') with any connection.

  python train.py --config=configs/vit.py:connection=hc,n=2,size=cpu --workdir=workdirs/vit_dhc2
  python train.py --config=configs/vit.py:connection=residual,size=cpu --workdir=workdirs/vit
  python train.py --config=configs/vit.py:connection=hc,n=2,dynamic=false,size=vit_b16 --workdir=DIR
  python eval.py --workdir=workdirs/vit_dhc2            # eval_loss and top-1 eval_accuracy

Arguments (after ':', comma-separated key=value):
  connection  residual (= residual_prenorm) | any registered kind: residual_prenorm |
              residual_postnorm | hc | mhc | frac | resi_dual | altup | vwn (see configs/lm.py)
  n, m        HC / mHC expansion rate, Frac-Connections frac-rate (paper: n = 2)
  dynamic     SHC (false) or DHC (true); tanh follows dynamic
  size        tiny | cpu (the embedded 8x8 digits, no download) | vit_b16 | vit_l16 (ImageNet,
              HC Table 12 hyper-parameters)
Leaves can still be overridden: --config.data.dataset=cifar10 --config.data.eval_split=test ...
"""

from configs import base
from configs import lm
from hyperconn_jax import config_lib
from hyperconn_jax.models import sizes

def _digits(c):
  """The embedded 8x8 digits: 4x4 patches (4 tokens), mean pooling, padding-1 random crops."""
  c.model.update(dict(name='vit', mlp_activation='gelu', norm='layernorm', norm_affine=True))
  c.model.vit.update(dict(image_size=8, patch_size=4, channels=1, num_classes=10, pool='gap',
                          dropout=0.0))
  c.data.update(dict(dataset='digits', train_split='train', eval_split='validation',
                     crop_padding=1, random_flip=False, mixup_alpha=0.0))
  c.optim.update(dict(lr=3e-3, b1=0.9, b2=0.999, weight_decay=0.05, schedule='cosine',
                      final_lr_frac=0.0, grad_clip=1.0))


def _cpu(c):
  """About 2 minutes on a 2-core CPU; well above chance (10%) on the digits' validation split."""
  _digits(c)
  c.model.update(dict(d_model=64, num_layers=4, num_heads=4, head_dim=16, mlp_dim=256))
  c.train.update(dict(batch_size=64, num_steps=600, log_every=20, eval_every=200,
                      eval_batches=0, checkpoint_every=200))
  c.optim.warmup_steps = 40


def _tiny(c):
  """Seconds-long runs for tests and smoke checks."""
  _digits(c)
  c.model.update(dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64))
  c.train.update(dict(batch_size=32, num_steps=40, log_every=5, eval_every=20, eval_batches=0,
                      checkpoint_every=20))
  c.optim.update(dict(lr=3e-3, warmup_steps=5))


def _paper(c, name):
  """ViT-B/16 or ViT-L/16 on ImageNet at 224 x 224 with HC Table 12: AdamW lr 0.003 (0.9, 0.999,
  eps 1e-8), batch 4096, cosine with 10k warmup steps, 300 epochs, clip 1.0, weight decay 0.3,
  dropout 0.1, mixup 0.2, bf16.

  imagenet2012 must be prepared in data.data_dir (TFDS needs the manually downloaded archives).
  """
  sizes.apply_size(c.model, name)
  c.model.update(dict(dtype='bfloat16', remat_policy='dots_no_batch'))
  c.model.vit.update(dict(pool='token', dropout=0.1))
  c.data.update(dict(dataset='imagenet2012', train_split='train', eval_split='validation',
                     crop_min_area=0.08, random_flip=True, mixup_alpha=0.2, worker_count=16))
  c.optim.update(dict(lr=0.003, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.3, schedule='cosine',
                      warmup_steps=10_000, final_lr_frac=0.0, grad_clip=1.0))
  # 300 epochs of the 1,281,167 ImageNet training images at 4096 per step.
  c.train.update(dict(batch_size=4096, num_steps=300 * 1_281_167 // 4096, log_every=100,
                      eval_every=2000, eval_batches=0, checkpoint_every=2000))


_SIZES = {'tiny': _tiny, 'cpu': _cpu, 'vit_b16': lambda c: _paper(c, 'vit_b16'),
          'vit_l16': lambda c: _paper(c, 'vit_l16')}


def get_config(arg=None):
  """Returns the config for the switches in `arg` (see the module docstring)."""
  a = config_lib.parse_arg(arg, connection='hc', n=2, m=2, dynamic=True, size='cpu')
  if a.size not in _SIZES:
    raise ValueError(f'config argument size={a.size!r} must be one of {tuple(_SIZES)}')
  c = base.get_config()
  _SIZES[a.size](c)
  lm.set_connection(c, a.connection, n=a.n, m=a.m, dynamic=a.dynamic, tanh=a.dynamic)
  c.lock()
  return c
