"""The entry points' error handling (hyperconn_jax/cli.py), through real subprocesses: a bad flag,
config value or path prints one line and exits with status 2; other failures keep a traceback."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def start(*argv):
  return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))


def finish(proc):
  out, err = proc.communicate(timeout=TIMEOUT_S)
  return proc.returncode, out, err


def test_usage_errors_are_one_line_with_status_2(tmp_path):
  missing = str(tmp_path / 'missing')
  # The entry points run at once (each imports JAX); every case is an error before any training.
  cases = {
      'train.py bad config value': (
          ('train.py', '--config=configs/lm.py:size=tiny', '--config.model.d_model=-8',
           f'--workdir={missing}'),
          'train.py: error: model.d_model'),
      'train.py unknown config field': (
          ('train.py', '--config=configs/lm.py:size=tiny', '--config.train.num_stepz=3'),
          'train.py: error: '),
      'eval.py not a run': (('eval.py', f'--workdir={missing}'),
                            f'eval.py: error: --workdir={missing}: no config.json'),
      'sweep.py unknown suite': (('sweep.py', '--suite=nope', f'--workroot={missing}'),
                                 "sweep.py: error: --suite='nope'"),
      'sweep.py bad lr grid': (('sweep.py', '--suite=prenorm', '--lr_grid=fast'),
                               'sweep.py: error: --lr_grid=fast'),
      'analyze.py unknown analysis': (('analyze.py', f'--workdir={missing}', '--analyses=nope'),
                                      'analyze.py: error: --analyses'),
  }
  procs = {name: start(*argv) for name, (argv, _) in cases.items()}
  for name, (_, expected) in cases.items():
    code, out, err = finish(procs[name])
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(expected), (name, code, err[-2000:])
    assert 'Traceback' not in err, (name, err[-2000:])
  assert not os.path.exists(missing)  # Nothing was written.


def test_unexpected_failures_keep_their_traceback():
  script = ('from hyperconn_jax import cli\n'
            'def main(argv):\n'
            '  with cli.usage_errors():\n'
            '    pass\n'
            '  raise ValueError("a bug, not the user\'s input")\n'
            'cli.run(main)\n')
  code, _, err = finish(start('-c', script))
  assert code == 1 and 'Traceback' in err and "ValueError: a bug, not the user's input" in err
