"""A profiler window: traces a few training updates on process 0 for TensorBoard / XProf."""

from absl import logging
import jax


class ProfileWindow:
  """Traces updates start_step + 1 .. start_step + num_steps (1-based update numbers).

  The trace goes to `directory` in the layout TensorBoard's profile plugin and XProf read
  (directory/plugins/profile/<run>/<host>.xplane.pb). Only on process 0 and when num_steps > 0;
  a run resumed after start_step traces nothing.
  """

  def __init__(self, directory: str, *, start_step: int, num_steps: int, enabled: bool):
    self._directory = str(directory)
    self._first, self._last = start_step + 1, start_step + num_steps
    self._enabled = enabled and num_steps > 0
    self._active = False

  def before_update(self, step: int) -> None:
    """Call before dispatching update `step`."""
    if self._enabled and step == self._first:
      jax.profiler.start_trace(self._directory)
      self._active = True

  def after_update(self, step: int, outputs) -> None:
    """Call after dispatching update `step` with its outputs (waited for before the trace ends)."""
    if self._active and step == self._last:
      jax.block_until_ready(outputs)
      self.close()
      logging.info('Profile of updates %d-%d written to %s.', self._first, self._last,
                   self._directory)

  def close(self) -> None:
    """Ends an unfinished trace (the run stopped inside the window)."""
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
