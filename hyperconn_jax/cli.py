"""What the command-line entry points (train.py, eval.py, sweep.py, analyze.py) share: a bad flag,
config value or input path prints one line and exits with status 2; any other failure keeps its
traceback.

  from hyperconn_jax import cli

  def main(argv):
    with cli.usage_errors():
      config_lib.validate(config)  # A ValueError here is the user's input: one line.
    ...                            # Errors here are unexpected: a traceback.

  if __name__ == '__main__':
    cli.run(main)
"""

import contextlib
import os
import sys

from absl import app
from absl import flags

EXIT_USAGE = 2  # As argparse and most Unix tools exit for usage errors.


class UsageError(ValueError):
  """Bad input from the user (a flag, a config value, a path): `run` prints its message as one
  line. A ValueError, so library callers that catch ValueError still do."""


@contextlib.contextmanager
def usage_errors():
  """Turns a ValueError raised inside (input validation) into a UsageError."""
  try:
    yield
  except UsageError:
    raise
  except ValueError as e:
    raise UsageError(str(e)) from e


def run(main) -> None:
  """app.run(main), with flag-parsing errors, app.UsageError and UsageError printed as
  '<program>: error: <message>' on stderr and exit status 2."""

  def main_with_usage_errors(argv):
    try:
      return main(argv)
    except (UsageError, app.UsageError) as e:
      _exit_usage(str(e))

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    # ml_collections' --config.a.b flags raise AttributeError / KeyError for unknown fields, and a
    # config file's arguments raise ValueError: all from the command line.
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
      _exit_usage(f'{_text(e)} (--helpfull lists the flags)')

  app.run(main_with_usage_errors, flags_parser=parse_flags)


def _text(e: BaseException) -> str:
  """The message of e, unwrapped from the exceptions that carry it, on one line."""
  while isinstance(e, BaseException) and e.args:
    e = e.args[0]
  text = str(e)
  # ml_collections puts a config file's traceback into its message: keep its last line.
  head, found, trace = text.partition('Traceback (most recent call last):')
  if found:
    text = head + trace.strip().splitlines()[-1]
  return ' '.join(text.split())


def _exit_usage(message: str) -> None:
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)
