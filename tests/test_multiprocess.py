"""Two processes with 4 simulated CPU devices each, coordinated by jax.distributed over 127.0.0.1
(gloo collectives), train the run of tests/train_runs.py that one process trains on 8 devices.

Phase 1 is preempted: SIGTERM reaches process 1 only, JAX's preemption service makes both stop at
the same step, save it collectively and exit 0. Phase 2 (the same commands) restores that
checkpoint collectively, each process its own data iterator state, and trains to the end with
evaluations. Every step's loss, the eval losses and the final parameters must equal the
single-process run's within 1e-5 (the batch is the same; only the order of float reductions over
the devices differs). Each process reads only its own data shard (data.num_shards=2), and one
process resumes the two processes' checkpoint (the iterator state is per shard).
"""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

import train_runs
from hyperconn_jax import train_lib

NUM_PROCESSES = 2


def run_processes(corpus, workdir, logs, jax_caches, *, step_delay=0.0, on_started=None):
  """Starts the processes, calls on_started(procs) and waits for all to exit 0 (AssertionError
  with their logs otherwise)."""
  address = f'127.0.0.1:{train_runs.free_port()}'
  procs = []
  try:
    for index in range(NUM_PROCESSES):
      procs.append(train_runs.start(corpus, workdir, logs[index], jax_cache=jax_caches[index],
                                    num_devices=4, step_delay=step_delay,
                                    process=(address, NUM_PROCESSES, index)))
    if on_started is not None:
      on_started(procs)
    train_runs.wait_all(procs, logs)
  finally:
    train_runs.kill_all(procs)  # A process left hanging by a failed peer is killed here.


@pytest.fixture(scope='module')
def multiprocess_run(tmp_path_factory):
  corpus = train_runs.prepared_corpus(tmp_path_factory)
  root = tmp_path_factory.mktemp('multiprocess')
  workdir = str(root / 'run')
  caches = [train_runs.cache_dir(tmp_path_factory, f'process{i}of2') for i in range(2)]
  logs = [[str(root / f'phase{phase}_process{i}.txt') for i in range(2)] for phase in (1, 2)]

  def preempt_process_1(procs):
    train_runs.wait_until(lambda: len(train_runs.train_losses(workdir)) >= 2, procs,
                          'step 2', logs[0][0])
    train_runs.send(procs[1], signal.SIGTERM)

  out = {'workdir': workdir, 'logs': logs, 'corpus': corpus}
  # Each phase fails the fixture unless both processes exit 0.
  run_processes(corpus, workdir, logs[0], caches, step_delay=0.3, on_started=preempt_process_1)
  out['after_phase1'] = train_runs.finalized_steps(workdir)
  run_processes(corpus, workdir, logs[1], caches)
  return out


def read(path):
  with open(path) as f:
    return f.read()


def test_preempted_together_and_resumed_collectively(multiprocess_run):
  logs = multiprocess_run['logs']
  stopped_at = max(multiprocess_run['after_phase1'])
  assert stopped_at < train_runs.NUM_STEPS
  for index in range(NUM_PROCESSES):
    assert f'Stopping after step {stopped_at} (preemption)' in read(logs[0][index])
  for index in range(NUM_PROCESSES):
    text = read(logs[1][index])
    assert f'Resumed from checkpoint step {stopped_at} ' in text
    assert 'process_count": 2' in text and 'device_count": 8' in text  # The run's facts.


def test_losses_and_params_equal_single_process_8_devices(multiprocess_run, tmp_path_factory):
  reference = train_runs.reference_run(tmp_path_factory)
  workdir = multiprocess_run['workdir']
  got, want = train_runs.train_losses(workdir), train_runs.train_losses(reference)
  assert sorted(got) == list(range(1, train_runs.NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-5)
  got, want = train_runs.eval_losses(workdir), train_runs.eval_losses(reference)
  assert sorted(got) == sorted(want) == [6, 12]
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-5)
  config = train_runs.make_config(multiprocess_run['corpus'])
  got = train_runs.restore_state(config, workdir, train_runs.NUM_STEPS)
  want = train_runs.restore_state(config, reference, train_runs.NUM_STEPS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_eval_of_two_process_checkpoint_in_one_process(multiprocess_run):
  import eval as eval_main
  workdir = multiprocess_run['workdir']
  result = eval_main.evaluate_checkpoint(workdir, 'latest')
  assert result['step'] == train_runs.NUM_STEPS
  np.testing.assert_allclose(result['eval_loss'],
                             train_runs.eval_losses(workdir)[train_runs.NUM_STEPS], atol=1e-5)


def test_resume_on_one_process_from_the_two_process_checkpoint(multiprocess_run, tmp_path,
                                                                 tmp_path_factory, monkeypatch):
  """With a fixed data.num_shards the data iterator state is per shard: one process takes both
  shards' states from the two processes' files and trains on as the two would have."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(multiprocess_run['workdir'], workdir)
  saved = train_runs.finalized_steps(workdir)
  for step in (8, 12):  # Resume from an earlier step (the preemption's or 4), saved by both.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  # Other shards (data.num_shards=0: one per process, so 1 here) cannot take those states: a clear
  # error before anything is compiled, and nothing is moved aside.
  original = train_lib.make_train_step

  def not_reached(*args, **kwargs):
    raise AssertionError('training started')

  monkeypatch.setattr(train_lib, 'make_train_step', not_reached)
  with pytest.raises(ValueError, match=r'written by 2 processes, but this run has 1.*fixed '
                     r'data.num_shards'):
    train_lib.train_and_evaluate(
        train_runs.make_config(multiprocess_run['corpus'], **{'data.num_shards': 0}), workdir)
  assert train_runs.finalized_steps(workdir) == [s for s in saved if s < 8]
  monkeypatch.setattr(train_lib, 'make_train_step', original)
  config = train_runs.make_config(multiprocess_run['corpus'])
  train_lib.train_and_evaluate(config, workdir)
  got = train_runs.restore_state(config, workdir, train_runs.NUM_STEPS)
  want = train_runs.restore_state(config, train_runs.reference_run(tmp_path_factory),
                                  train_runs.NUM_STEPS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_workdir_not_shared_fails_before_compiling(tmp_path, tmp_path_factory):
  """Each process given its own directory (as a host-local /tmp would be): both stop with the
  error naming the processes that cannot see process 0's token, before anything is compiled."""
  corpus = train_runs.prepared_corpus(tmp_path_factory)
  address = f'127.0.0.1:{train_runs.free_port()}'
  logs = [str(tmp_path / f'process{i}.txt') for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for index in range(NUM_PROCESSES):
      procs.append(train_runs.start(
          corpus, str(tmp_path / f'host{index}' / 'run'), logs[index],
          jax_cache=train_runs.cache_dir(tmp_path_factory, f'process{index}of2'), num_devices=4,
          process=(address, NUM_PROCESSES, index)))
    codes = [train_runs.wait(proc, log) for proc, log in zip(procs, logs)]
  finally:
    train_runs.kill_all(procs)
  for code, log in zip(codes, logs):
    text = read(log)
    assert code != 0 and 'is not shared by all 2 processes: processes [1] cannot read' in text, (
        train_runs.log_tail(log))
    assert 'Model:' not in text  # Stopped before building the model.
  assert not (tmp_path / 'host0' / 'run' / 'metrics.jsonl').exists()
