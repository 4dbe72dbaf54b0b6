"""Option checks shared by the connection kinds.

Every failure is a ValueError naming the field (model.connection.<kind>.<field>), the bad value and
what is allowed, raised before any parameter is created.
"""

import numbers

from hyperconn_jax import norms

OUT_PROJ_SQRT_N = ('none', 'divide', 'multiply')


class Fields:
  """The checks of one kind's sub-config `cfg` (config.model.connection.<kind>)."""

  def __init__(self, cfg, kind: str):
    self.cfg, self.kind = cfg, kind

  def name(self, field: str) -> str:
    return f'model.connection.{self.kind}.{field}'

  def fail(self, field: str, value, allowed: str):
    raise ValueError(f'{self.name(field)} must be {allowed}, got {value!r}')

  def integer(self, field: str, minimum: int) -> None:
    """Requires the field to be an integer >= minimum (bools are not integers here)."""
    value = getattr(self.cfg, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
      self.fail(field, value, f'an integer >= {minimum}')

  def greater(self, field: str, bound: float) -> None:
    """Requires the field to be a real number > bound."""
    value = getattr(self.cfg, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > bound:
      self.fail(field, value, f'a number > {bound}')

  def one_of(self, field: str, allowed: tuple) -> None:
    value = getattr(self.cfg, field)
    if value not in allowed:
      self.fail(field, value, f'one of {allowed}')

  def static_dynamic(self) -> None:
    """Checks the options of the HC / Frac static and dynamic coefficients.

    A static variant ignores the norm and scale options of the dynamic branch, but tanh=True is
    refused there: it would silently mean nothing (tanh acts on the dynamic projection only).
    """
    cfg = self.cfg
    if not cfg.dynamic:
      if cfg.tanh:
        self.fail('tanh', cfg.tanh, f'False when {self.name("dynamic")} is False '
                  '(tanh acts on the dynamic projection only)')
      return
    self.one_of('dynamic_norm', norms.NORM_KINDS)
    if cfg.dynamic_norm == 'none' and cfg.dynamic_norm_affine:
      self.fail('dynamic_norm_affine', cfg.dynamic_norm_affine,
                f"False when {self.name('dynamic_norm')} is 'none' (there is no norm to scale)")


def out_proj_multiplier(cfg, num_streams: int) -> float:
  """cfg.out_proj_sqrt_n: 'none' -> 1, 'divide' -> 1/sqrt(N), 'multiply' -> sqrt(N) (HC section 4:
  the init std of the sub-layers' output projections; the paper does not say which direction)."""
  return {'none': 1.0, 'divide': num_streams ** -0.5,
          'multiply': num_streams ** 0.5}[cfg.out_proj_sqrt_n]
