"""Tests of config parsing and validation (configs/base.py defaults, parse_arg, validate)."""

import ml_collections
import pytest

from configs import base, default
from hyperconn_jax import config_lib, connections


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


_HC, _MHC, _FRAC, _ALTUP = ({'model.connection.kind': k} for k in ('hc', 'mhc', 'frac', 'altup'))
_VWN = {'model.connection.kind': 'vwn', 'model.tie_embeddings': False}
_MOE = {'model.ffn': 'moe'}
_VIT = {'model.name': 'vit', 'data.dataset': 'digits'}

# Every constrained field of configs/base.py with a bad value, and the settings under which the
# field is read (e.g. Sinkhorn options only matter for model.connection.kind='mhc').
BAD_VALUES = [
    ('seed', True, {}),
    ('model.name', 'gpt', {}),
    ('model.vocab_size', 0, {}),
    ('model.vocab_size', 100, {}),  # Smaller than the byte tokenizer's vocabulary.
    ('model.d_model', 0, {}),
    ('model.num_layers', 0, {}),
    ('model.num_heads', -1, {}),
    ('model.head_dim', 15, {}),  # RoPE needs an even head_dim.
    ('model.mlp_dim', 0, {}),
    ('model.norm', 'batchnorm', {}),
    ('model.norm_eps', 0.0, {}),
    ('model.rope_theta', -1.0, {}),
    ('model.init_std', 0.0, {}),
    ('model.dtype', 'float16', {}),
    ('model.param_dtype', 'int8', {}),
    ('model.remat_policy', 'some', {}),
    ('model.init', 'xavier', {}),
    ('model.stream_dtype', 'float16', {}),
    ('model.attention', 'flash', {}),
    ('model.attention', 'cudnn', {}),  # Needs model.dtype='bfloat16'.
    ('model.attention_block_q', 0, {}),
    ('model.attention_block_kv', -1, {}),
    ('model.attention_block_rows', 0, {}),
    ('model.scan_unroll', -1, {}),
    ('model.ffn', 'sparse', {}),
    ('model.mlp_activation', 'relu', {}),
    ('model.connection.kind', 'nope', {}),
    ('model.connection.hc.n', 0, _HC),
    ('model.connection.mhc.n', 0, _MHC),
    ('model.connection.frac.m', 0, _FRAC),
    ('model.connection.frac.m', 5, _FRAC),  # Must divide model.d_model=256.
    ('model.connection.hc.dynamic_norm', 'batchnorm', _HC),
    ('model.connection.hc.out_proj_sqrt_n', 'half', _HC),
    ('model.connection.mhc.sinkhorn_iters', 0, _MHC),
    ('model.connection.mhc.post_mult', 0.0, _MHC),
    ('model.connection.mhc.res_init', 'random', _MHC),
    ('model.connection.mhc.pre_init', 'random', _MHC),
    ('model.connection.mhc.pre_off_home', 0.3, _MHC),  # n = 4: must be below 1/4.
    ('model.connection.mhc.pre_off_home', 0.0, _MHC),
    ('model.connection.mhc.mappings', ('pre', 'bogus'), _MHC),
    ('model.connection.mhc.reduce', 'mean', _MHC),
    ('model.connection.frac.dynamic_norm', 'batchnorm', _FRAC),
    ('model.connection.mhc.index_base', -1, _MHC),
    ('model.connection.hc.index_base', -1, _HC),
    ('model.connection.altup.n', 0, _ALTUP),
    ('model.connection.altup.index_base', -1, _ALTUP),
    ('model.connection.mhc.out_proj_sqrt_n', 'half', _MHC),
    ('model.connection.vwn.m', 3, _VWN),  # Must divide model.d_model=256.
    ('model.connection.vwn.n', 1, _VWN),  # n >= m.
    ('model.connection.vwn.reduce_norm', 'batch', _VWN),
    ('model.connection.vwn.reduce_init', 'zeros', _VWN),
    ('model.tie_embeddings', True, _VWN),  # The 2x wider embedding cannot be tied.
    ('model.moe.num_experts', 0, _MOE),
    ('model.moe.top_k', 0, _MOE),
    ('model.moe.top_k', 9, _MOE),  # More than model.moe.num_experts=8.
    ('model.moe.capacity_factor', -1.0, _MOE),
    ('model.moe.load_balance_weight', -1.0, _MOE),
    ('model.moe.router_z_weight', -1.0, _MOE),
    ('model.vit.image_size', 0, _VIT),
    ('model.vit.patch_size', 0, _VIT),
    ('model.vit.channels', 0, _VIT),
    ('model.vit.num_classes', 0, _VIT),
    ('model.vit.pool', 'max', _VIT),
    ('model.vit.dropout', 1.5, _VIT),
    ('data.dataset', '', {}),
    ('data.data_dir', None, {}),
    ('data.text_glob', '', {'data.dataset': 'text_files'}),
    ('data.text_key', '', {}),
    ('data.train_split', '', {}),
    ('data.eval_split', '', {}),
    ('data.tokenizer', 'wordpiece', {}),
    ('data.tokenizer_path', '', {'data.tokenizer': 'sentencepiece'}),
    ('data.seq_len', 0, {}),
    ('data.eval_fraction', 0.0, {}),
    ('data.shuffle_seed', -1, {}),
    ('data.shuffle_window', -2, {}),
    ('data.worker_count', -1, {}),
    ('data.num_shards', -1, {}),
    ('data.read_threads', 0, {}),
    ('data.piece_chars', -1, {}),
    ('data.min_eval_tokens', -1, {}),
    ('data.crop_padding', -1, {}),
    ('data.crop_min_area', 0.0, {}),
    ('data.mixup_alpha', -1.0, {}),
    ('optim.lr', 0.0, {}),
    ('optim.b1', 1.0, {}),
    ('optim.b2', -0.1, {}),
    ('optim.eps', 0.0, {}),
    ('optim.weight_decay', -0.1, {}),
    ('optim.schedule', 'linear', {}),
    ('optim.warmup_steps', -1, {}),
    ('optim.final_lr_frac', 1.5, {}),
    ('optim.step_fracs', (0.9, 0.8), {}),
    ('optim.step_factors', (0.1,), {}),
    ('optim.grad_clip', -1.0, {}),
    ('optim.grad_accum_steps', 0, {}),
    ('optim.z_loss', -1e-4, {}),
    ('optim.moment_dtype', 'float16', {}),
    ('train.batch_size', 0, {}),
    ('train.batch_size', 12, {'data.num_shards': 8}),
    ('train.num_steps', 0, {}),
    ('train.log_every', 0, {}),
    ('train.eval_every', 0, {}),
    ('train.eval_batches', True, {}),
    ('train.checkpoint_every', 0, {}),
    ('train.profile_start_step', -1, {}),
    ('train.profile_num_steps', -2, {}),
    ('train.host_malloc', 'fast', {}),
    ('checkpoint.keep_latest', 0, {}),
    ('checkpoint.keep_best', -1, {}),
    ('checkpoint.keep_every', 3, {}),  # Not a multiple of train.checkpoint_every (200).
    ('train.eval_batch_size', -1, {}),
    ('mesh.shape', (1, -1), {}),
    ('mesh.shape', (-1, -1, 1), {}),
    ('mesh.shape', (0, 1, 1), {}),
    ('mesh.axes', ('data', 'data', 'tensor'), {}),
    ('mesh.rules', (('embed', 'model'),), {}),
    ('mesh.rules', (1,), {}),
]
# Fields without a constraint beyond their type.
UNCONSTRAINED = {
    *(f'model.connection.{k}.{f}' for k in ('hc', 'frac') for f in ('alpha_scale_init',
                                                                     'beta_scale_init')),
    'model.connection.mhc.gate_init', 'model.connection.mhc.res_offdiag_logit',  # Initial values.
    'train.compilation_cache_dir',  # Any path or URL ('' is off).
}
# Checked by the image pipeline (data/images.py) when it opens the dataset, before compilation.
IMAGE_PIPELINE = {'data.image_key', 'data.label_key'}


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _booleans():
  return sorted(path for path, value in _leaves(base.get_config()) if isinstance(value, bool))


def test_every_field_is_covered():
  covered = {row[0] for row in BAD_VALUES} | UNCONSTRAINED | IMAGE_PIPELINE | set(_booleans())
  assert covered == {path for path, _ in _leaves(base.get_config())}


@pytest.mark.parametrize('path,value,context', BAD_VALUES,
                         ids=[f'{p}={v!r}' for p, v, _ in BAD_VALUES])
def test_validate_names_field_value_and_allowed(path, value, context):
  c = base.get_config()
  for key, setting in context.items():
    _set(c, key, setting)
  _set(c, path, value)
  with pytest.raises(ValueError) as error:
    config_lib.validate(c)
  message = str(error.value)
  assert path in message and repr(value) in message, message
  assert len(message) > len(path) + len(repr(value)) + 10, message  # Says what is allowed.


@pytest.mark.parametrize('path', _booleans())
def test_boolean_fields_refuse_other_types(path):
  c = base.get_config()
  c.lock()
  with pytest.raises(TypeError, match=path.rpartition('.')[2]):
    _set(c, path, 'maybe')


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


def test_default_configs_validate_and_are_the_documented_runs():
  # configs/base.py validates with every connection kind's defaults; configs/default.py is the run
  # README.md documents (DHC x4, d 128, 4 layers, byte-level, embedded corpus) and validates.
  for kind in connections.KINDS:
    config = base.get_config()
    config.model.connection.kind = kind
    # A kind that widens the embedding (vwn) needs an untied unembedding.
    width = connections.layout(config.model.connection, config.model.d_model).embed_width
    config.model.tie_embeddings = width == config.model.d_model
    config_lib.validate(config)
  config = default.get_config()
  config_lib.validate(config)
  m = config.model
  hc = m.connection.hc
  assert (m.connection.kind, hc.n, hc.dynamic, hc.tanh) == ('hc', 4, True, True)
  assert (m.d_model, m.num_layers, m.vocab_size) == (128, 4, 256)
  assert (config.data.dataset, config.data.tokenizer) == ('stdlib', 'bytes')
