"""Config helpers: ablation-switch parsing for `get_config(arg)` and validation of every field.

`validate(config)` runs before anything is compiled and raises ValueError naming the field, the bad
value and what is allowed.
"""

import math
from typing import Any

import ml_collections

from hyperconn_jax import data, host_malloc, models, sharding

SCHEDULES = ('cosine', 'constant', 'step')
MOMENT_DTYPES = ('float32', 'bfloat16')
_TRUE, _FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')


def _parse_value(key: str, text: str, default: Any) -> Any:
  """Parses `text` to the type of `default`."""
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f'config argument {key!r} must be a boolean (true/false), got {text!r}')
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f'config argument {key!r} must be an integer, got {text!r}') from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'config argument {key!r} must be a number, got {text!r}') from None
  return text


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' ablation switches (the part after ':' in --config=path.py:ARG).

  Args:
    arg: the string, or None / '' for all defaults. A bare 'key' means key=true for booleans.
    **spec: the allowed keys with their defaults; each value is parsed to its default's type.

  Returns:
    A locked ConfigDict with every key of `spec`.
  """
  out = ml_collections.ConfigDict(spec)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if key not in spec:
      raise ValueError(f'unknown config argument {key!r}; allowed: {", ".join(sorted(spec))}')
    if not sep:
      if not isinstance(spec[key], bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      text = 'true'
    out[key] = _parse_value(key, text.strip(), spec[key])
  out.lock()
  return out


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f'{field}={value!r} is invalid: {allowed}')


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(field: str, value: Any) -> None:
  _check(_is_int(value) and value >= 1, field, value, 'must be an integer >= 1')


def _validate_optim(o) -> None:
  _check(o.lr > 0, 'optim.lr', o.lr, 'must be > 0')
  for name in ('b1', 'b2'):
    _check(0.0 <= o[name] < 1.0, f'optim.{name}', o[name], 'must be in [0, 1)')
  _check(o.eps > 0, 'optim.eps', o.eps, 'must be > 0')
  _check(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'must be >= 0')
  _check(o.schedule in SCHEDULES, 'optim.schedule', o.schedule, f'must be one of {SCHEDULES}')
  _check(_is_int(o.warmup_steps) and o.warmup_steps >= 0, 'optim.warmup_steps',
         o.warmup_steps, 'must be an integer >= 0')
  _check(0.0 <= o.final_lr_frac <= 1.0, 'optim.final_lr_frac', o.final_lr_frac, 'must be in [0, 1]')
  _check(len(o.step_fracs) == len(o.step_factors), 'optim.step_factors', o.step_factors,
         f'must have one factor per entry of optim.step_fracs={o.step_fracs}')
  _check(all(0 < f < 1 for f in o.step_fracs) and list(o.step_fracs) == sorted(o.step_fracs),
         'optim.step_fracs', o.step_fracs, 'must be increasing fractions in (0, 1)')
  _check(all(f > 0 for f in o.step_factors), 'optim.step_factors', o.step_factors,
         'must be positive')
  _check(o.grad_clip >= 0, 'optim.grad_clip', o.grad_clip, 'must be >= 0 (0 disables clipping)')
  _positive_int('optim.grad_accum_steps', o.grad_accum_steps)
  _check(o.z_loss >= 0, 'optim.z_loss', o.z_loss, 'must be >= 0')
  _check(o.moment_dtype in MOMENT_DTYPES, 'optim.moment_dtype', o.moment_dtype,
         f'must be one of {MOMENT_DTYPES}')


def _validate_train(config) -> None:
  t = config.train
  for name in ('batch_size', 'num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    _positive_int(f'train.{name}', t[name])
  _check(_is_int(t.eval_batches), 'train.eval_batches', t.eval_batches,
         'must be an integer (<= 0: the whole validation split)')
  for name in ('profile_start_step', 'profile_num_steps'):
    _check(_is_int(t[name]) and t[name] >= 0, f'train.{name}', t[name], 'must be an integer >= 0')
  host_malloc.validate(t.host_malloc)
  _check(t.batch_size % config.optim.grad_accum_steps == 0, 'train.batch_size', t.batch_size,
         f'must be divisible by optim.grad_accum_steps={config.optim.grad_accum_steps}')
  if config.data.num_shards > 0:
    _check(t.batch_size % config.data.num_shards == 0, 'train.batch_size', t.batch_size,
           f'must be divisible by data.num_shards={config.data.num_shards}')
  _check(_is_int(t.eval_batch_size) and t.eval_batch_size >= 0, 'train.eval_batch_size',
         t.eval_batch_size, 'must be an integer >= 0 (0: train.batch_size / '
         'optim.grad_accum_steps)')
  c = config.checkpoint
  _positive_int('checkpoint.keep_latest', c.keep_latest)
  _check(_is_int(c.keep_best) and c.keep_best >= 0, 'checkpoint.keep_best', c.keep_best,
         'must be an integer >= 0')
  _check(_is_int(c.keep_every) and c.keep_every >= 0 and c.keep_every % t.checkpoint_every == 0,
         'checkpoint.keep_every', c.keep_every,
         f'must be 0 (off) or a multiple of train.checkpoint_every={t.checkpoint_every} (only '
         'saved steps can be kept)')


def _validate_mesh(m) -> None:
  _check(all(isinstance(a, str) and a for a in m.axes) and len(set(m.axes)) == len(m.axes),
         'mesh.axes', m.axes, 'must be distinct, non-empty names')
  _check(len(m.shape) == len(m.axes), 'mesh.shape', m.shape,
         f'must have one size per axis of mesh.axes={m.axes}')
  _check(all(isinstance(s, int) and (s >= 1 or s == -1) for s in m.shape), 'mesh.shape', m.shape,
         'sizes must be integers >= 1, or -1 (fill with the remaining devices)')
  _check(sum(s == -1 for s in m.shape) <= 1, 'mesh.shape', m.shape, 'at most one entry may be -1')
  for rule in m.rules:
    _check(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str),
           'mesh.rules', m.rules,
           f'each rule must be (logical_name, mesh_axis | tuple of mesh axes | None), not {rule!r}')
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in targets:
      _check(axis is None or axis in m.axes, 'mesh.rules', m.rules,
             f'rule {rule!r}: mesh axes must be among mesh.axes={m.axes} or None')


def validate_mesh_for_devices(config, num_devices: int) -> None:
  """Checks that config.mesh fits `num_devices` and the global batch divides over its batch axes."""
  sizes = dict(zip(config.mesh.axes, sharding.mesh_shape(config.mesh, num_devices)))
  batch_axes = dict(config.mesh.rules).get('batch')
  batch_axes = batch_axes if isinstance(batch_axes, (tuple, list)) else (batch_axes,)
  shards = math.prod(sizes[a] for a in batch_axes if a is not None)
  micro = config.train.batch_size // config.optim.grad_accum_steps
  _check(micro % shards == 0, 'train.batch_size', config.train.batch_size,
         f'the micro-batch (batch_size / optim.grad_accum_steps = {micro}) must be divisible by '
         f'the {shards} shards of the batch mesh axes {tuple(batch_axes)}')
  _check(data.eval_batch_size(config) % shards == 0, 'train.eval_batch_size',
         config.train.eval_batch_size, f'the eval batch ({data.eval_batch_size(config)} rows) must be '
         f'divisible by the {shards} shards of the batch mesh axes {tuple(batch_axes)}')


def validate_step(config) -> None:
  """Validates the fields the train step is built from (seed, model, optim, train, mesh), not the
  data source (the ahead-of-time pod check compiles without data); raises ValueError."""
  _check(_is_int(config.seed), 'seed', config.seed, 'must be an integer')
  models.validate(config.model)
  _validate_optim(config.optim)
  _validate_train(config)
  _validate_mesh(config.mesh)


def validate(config) -> None:
  """Validates every constrained field of a full config; raises ValueError before any compilation."""
  validate_step(config)
  data.validate(config.data)
  vocab = data.get_tokenizer(config.data).vocab_size
  _check(config.model.vocab_size >= vocab, 'model.vocab_size', config.model.vocab_size,
         f'must be >= the tokenizer vocabulary ({vocab}, data.tokenizer={config.data.tokenizer!r})')
