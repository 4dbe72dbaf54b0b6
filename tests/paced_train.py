"""train.py with a pause before each update, so that tests can signal a run in the middle.

  python tests/paced_train.py --step_delay=0.2 <train.py flags>

The pause is the only difference from train.py: the updates, checkpoints and outputs are the same.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import train  # noqa: E402
from hyperconn_jax import train_lib  # noqa: E402

_STEP_DELAY = flags.DEFINE_float('step_delay', 0.0, 'Seconds to sleep before each update.')


def paced(make_train_step):
  """Wraps train_lib.make_train_step so that each update first sleeps --step_delay seconds."""

  def make(config, setup):
    step = make_train_step(config, setup)

    def paced_step(state, batch):
      time.sleep(_STEP_DELAY.value)
      return step(state, batch)

    return paced_step

  return make


if __name__ == '__main__':
  train_lib.make_train_step = paced(train_lib.make_train_step)
  app.run(train.main)
