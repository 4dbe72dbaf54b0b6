"""Tests of config parsing and validation (configs/base.py defaults, parse_arg, validate)."""

import pytest

from configs import base
from hyperconn_jax import config_lib


def test_parse_arg_types_and_errors():
  a = config_lib.parse_arg('connection=mhc,n=8,dynamic=false,lr=1e-3,tanh', connection='hc', n=4,
                           dynamic=True, lr=3e-4, tanh=False)
  assert (a.connection, a.n, a.dynamic, a.lr, a.tanh) == ('mhc', 8, False, 1e-3, True)
  with pytest.raises(ValueError, match="unknown config argument 'nn'.*allowed: n"):
    config_lib.parse_arg('nn=3', n=4)
  with pytest.raises(ValueError, match="'n' must be an integer"):
    config_lib.parse_arg('n=four', n=4)
  with pytest.raises(ValueError, match="'dynamic' must be a boolean"):
    config_lib.parse_arg('dynamic=maybe', dynamic=True)
  assert config_lib.parse_arg(None, n=4).n == 4


def test_locked_config_suggests_nearest_key():
  c = base.get_config()
  c.lock()
  with pytest.raises(AttributeError, match='num_layers'):
    c.model.num_layer = 3


def _set(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize('path,value', [
    ('optim.lr', 0.0),
    ('optim.b2', 1.0),
    ('optim.schedule', 'linear'),
    ('optim.warmup_steps', -1),
    ('optim.final_lr_frac', 1.5),
    ('optim.step_fracs', (0.9, 0.8)),
    ('optim.step_factors', (0.1,)),
    ('optim.grad_clip', -1.0),
    ('optim.grad_accum_steps', 0),
    ('optim.z_loss', -1e-4),
    ('train.batch_size', 0),
    ('train.num_steps', 0),
    ('train.eval_every', 0),
    ('checkpoint.keep_latest', 0),
    ('checkpoint.keep_best', -1),
    ('mesh.shape', (1, -1)),
    ('mesh.shape', (-1, -1, 1)),
    ('mesh.shape', (0, 1, 1)),
    ('mesh.rules', (('embed', 'model'),)),
])
def test_validate_names_bad_field(path, value):
  c = base.get_config()
  _set(c, path, value)
  with pytest.raises(ValueError, match=path.replace('.', r'\.')):
    config_lib.validate(c)


def test_batch_must_divide_over_accumulation_and_mesh():
  c = base.get_config()
  c.optim.grad_accum_steps = 3
  with pytest.raises(ValueError, match=r'train\.batch_size'):
    config_lib.validate(c)
  c = base.get_config()
  c.train.batch_size = 12
  c.mesh.shape = (1, -1, 1)
  with pytest.raises(ValueError, match=r'train\.batch_size=12.*8 shards'):
    config_lib.validate_mesh_for_devices(c, 8)
  with pytest.raises(ValueError, match=r'mesh\.shape'):
    c.mesh.shape = (3, 1, 1)
    config_lib.validate_mesh_for_devices(c, 8)


def test_default_config_is_valid():
  config_lib.validate(base.get_config())
