"""The main job on a fresh machine: a small DHC x4 decoder on the embedded corpus (about 5 minutes
on a 2-core CPU, loss falling visibly).

  python train.py                 # same as the line below
  python train.py --config=configs/default.py --workdir=workdirs/default

The embedded corpus is the source of the running Python's standard library, byte-level; it is
prepared into ~/tensorflow_datasets on first use (seconds, no download).
"""

from configs import lm


def get_config(arg=None):
  del arg
  config = lm.get_config('connection=hc,n=4,dynamic=true,size=cpu')
  with config.unlocked():
    config.train.num_steps = 500  # About 5 minutes on an idle 2-core CPU (1M tokens).
  return config
