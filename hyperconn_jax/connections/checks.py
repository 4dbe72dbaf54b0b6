"""Option checks shared by the connection kinds.

Every failure is a ValueError naming the field of config.model.connection, the bad value and what
is allowed, raised before any parameter is created.
"""

import numbers

from hyperconn_jax import norms

OUT_PROJ_SQRT_N = ('none', 'divide', 'multiply')


def fail(field: str, value, allowed: str):
  raise ValueError(f'model.connection.{field} must be {allowed}, got {value!r}')


def integer(config, field: str, minimum: int) -> None:
  """Requires config.<field> to be an integer >= minimum (bools are not integers here)."""
  value = getattr(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    fail(field, value, f'an integer >= {minimum}')


def greater(config, field: str, bound: float) -> None:
  """Requires config.<field> to be a real number > bound."""
  value = getattr(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > bound:
    fail(field, value, f'a number > {bound}')


def one_of(config, field: str, allowed: tuple) -> None:
  value = getattr(config, field)
  if value not in allowed:
    fail(field, value, f'one of {allowed}')


def common(config) -> None:
  """Checks the options every kind reads."""
  one_of(config, 'out_proj_sqrt_n', OUT_PROJ_SQRT_N)


def static_dynamic(config) -> None:
  """Checks the options of the HC / Frac static and dynamic coefficients.

  A static variant ignores the norm and scale options of the dynamic branch, but tanh=True is
  refused there: it would silently mean nothing (tanh acts on the dynamic projection only).
  """
  if not config.dynamic:
    if config.tanh:
      fail('tanh', config.tanh, 'False when model.connection.dynamic is False '
           '(tanh acts on the dynamic projection only)')
    return
  one_of(config, 'dynamic_norm', norms.NORM_KINDS)
  if config.dynamic_norm == 'none' and config.dynamic_norm_affine:
    fail('dynamic_norm_affine', config.dynamic_norm_affine,
         "False when model.connection.dynamic_norm is 'none' (there is no norm to scale)")
