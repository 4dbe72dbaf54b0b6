"""Device mesh and logical-axis rules (sharded model creation: models.create_model).

Model code names only logical axes ('embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'streams',
'hc', 'batch', 'length'); config.mesh.rules maps them onto the mesh axes config.mesh.axes.

Divisibility: a dimension whose size is not divisible by the total size of the mesh axes its rule
names is replicated instead (e.g. the 4 x 4 HC matrices or a 3-layer stack on a 2-way axis), so any
model fits any mesh; only the large, evenly divisible dimensions get sharded. A logical name may
have several rules: the first one whose mesh axes divide the dimension and are not already used by
another dimension of the same parameter wins (MaxText-style fallbacks).
"""

import contextlib
import math

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh.shape for `num_devices` devices (one entry may be -1: filled in)."""
  shape, axes = tuple(mesh_config.shape), tuple(mesh_config.axes)
  if len(shape) != len(axes):
    raise ValueError(f'mesh.shape {shape} must have one entry per axis of mesh.axes {axes}')
  if any(not isinstance(s, int) or (s < 1 and s != -1) for s in shape) or shape.count(-1) > 1:
    raise ValueError(f'mesh.shape entries must be positive integers with at most one -1, '
                     f'got {shape}')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'mesh.shape {shape}: the fixed sizes (product {known}) do not divide the '
                       f'{num_devices} devices')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  elif known != num_devices:
    raise ValueError(f'mesh.shape {shape} has {known} devices, but {num_devices} are available '
                     f'(use -1 in one entry to fill in)')
  return shape


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh over config.mesh.axes with config.mesh.shape (-1 auto-filled), all axes Auto.

  Args:
    mesh_config: config.mesh.
    devices: the devices to use (default: all of jax.devices()).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  axes = tuple(mesh_config.axes)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_rules(mesh_config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """config.mesh.rules as a tuple for nnx.logical_axis_rules, checked against config.mesh.axes."""
  axes = tuple(mesh_config.axes)
  rules = []
  for rule in mesh_config.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'mesh.rules entries must be (logical_name, mesh_axes), got {rule!r}')
    name, mesh_axes = rule
    for axis in _as_tuple(mesh_axes):
      if axis not in axes:
        raise ValueError(f'mesh.rules maps {name!r} to unknown mesh axis {axis!r}; '
                         f'mesh.axes is {axes}')
    rules.append((name, mesh_axes))
  return tuple(rules)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules):
  """Context in which the mesh is set (jax.set_mesh) and logical names resolve by `rules`."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical_axes, shape, mesh: jax.sharding.Mesh, rules) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions have the names `logical_axes`.

  A name that is None is replicated; a dimension is replicated when no rule of its name has mesh
  axes that divide it (see the module docstring). Pass shape=None to skip the divisibility check.
  Raises ValueError for a name that has no rule.
  """
  known = {name for name, _ in rules}
  used, spec = set(), []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in known:
      raise ValueError(f'logical axis {name!r} has no rule in mesh.rules {rules}')
    chosen = None
    for rule_name, mesh_axes in rules:
      axes = _as_tuple(mesh_axes)
      if rule_name != name or used & set(axes):
        continue
      size = math.prod(mesh.shape[a] for a in axes)
      if shape is None or shape[i] % size == 0:
        chosen = axes
        break
    used |= set(chosen or ())
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Sharding constraint on an activation by logical names, when a mesh is set (jax.set_mesh)
  and logical rules are active (see `activate`); the identity otherwise (single-device use)."""
  mesh, rules = jax.sharding.get_abstract_mesh(), spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def variable_sharding(variable: nnx.Variable, mesh, rules) -> NamedSharding:
  """The NamedSharding of a variable on `mesh`, from its logical axis names (`out_sharding`)."""
  value = variable.get_value()
  names = variable.get_metadata().get('out_sharding') or (None,) * len(value.shape)
  return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of [B, L] token batches (logical ('batch', 'length')); B must be divisible by the
  size of the mesh axes 'batch' maps to."""
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), None, mesh, rules))
