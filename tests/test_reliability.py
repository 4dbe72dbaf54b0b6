"""Crash and preemption recovery, damaged checkpoints, an unwritable workdir and determinism.

train.py runs as subprocesses (tests/train_runs.py). One chain of runs in one workdir: SIGTERM
(checkpoint of the current step, exit 0), the same command again, SIGKILL after a new checkpoint,
the same command again to the end; then, in a copy, the newest checkpoint is damaged and the
command run once more. Each resumed run must end with the parameters of the uninterrupted
reference run, bit for bit, and the metrics of every step must be the reference's (run-to-run
determinism). In process: the reference run continued on meshes of 4, 2 and 1 devices.

Related tests elsewhere: SIGTERM resume in process and the NaN guard (test_train.py), each kind of
checkpoint damage (test_checkpoint.py), config validation (test_config_lib.py), corrupted, empty
and too short datasets and a missing SentencePiece model (test_data.py).
"""

import glob
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

import train_runs
from hyperconn_jax import checkpoint, data, evaluation, sharding, train_lib

STEP_DELAY = 0.3  # Seconds before each update of a run that gets signalled.


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return train_runs.prepared_corpus(tmp_path_factory)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  return train_runs.reference_run(tmp_path_factory)


@pytest.fixture(scope='module')
def config(corpus):
  return train_runs.make_config(corpus)


def assert_same_state(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def chain(corpus, reference, tmp_path_factory):
  """SIGTERM, resume + SIGKILL, resume to the end, all in one workdir; returns what happened."""
  del reference  # Compiles first, filling the compilation cache the chain's runs read.
  root = tmp_path_factory.mktemp('chain')
  workdir = str(root / 'run')
  jax_cache = train_runs.cache_dir(tmp_path_factory, 'single8')
  out = {'workdir': workdir, 'logs': [str(root / f'log{i}.txt') for i in range(3)]}
  procs = []
  try:
    # 1. SIGTERM once the first update is logged (it lands between the periodic checkpoints).
    log = out['logs'][0]
    procs.append(train_runs.start(corpus, workdir, log, jax_cache=jax_cache,
                                  step_delay=STEP_DELAY))
    train_runs.wait_until(lambda: train_runs.train_losses(workdir), procs[-1:], 'step 1', log)
    train_runs.send(procs[-1], signal.SIGTERM)
    out['sigterm_rc'] = train_runs.wait(procs[-1], log)
    out['after_sigterm'] = (train_runs.finalized_steps(workdir),
                            max(train_runs.train_losses(workdir)),
                            os.listdir(os.path.join(workdir, 'checkpoints')))
    preempted_at = max(out['after_sigterm'][0])
    # 2. The same command; SIGKILL once a checkpoint newer than the preemption one is complete.
    log = out['logs'][1]
    procs.append(train_runs.start(corpus, workdir, log, jax_cache=jax_cache,
                                  step_delay=STEP_DELAY))
    train_runs.wait_until(lambda: max(train_runs.finalized_steps(workdir)) > preempted_at,
                          procs[-1:], f'a checkpoint after step {preempted_at}', log)
    train_runs.send(procs[-1], signal.SIGKILL)
    out['sigkill_rc'] = train_runs.wait(procs[-1], log)
    out['after_sigkill'] = train_runs.finalized_steps(workdir)
    # 3. The same command to the end.
    log = out['logs'][2]
    procs.append(train_runs.start(corpus, workdir, log, jax_cache=jax_cache))
    out['final_rc'] = train_runs.wait(procs[-1], log)
  finally:
    train_runs.kill_all(procs)
  return out


def read(path):
  with open(path) as f:
    return f.read()


def test_sigterm_saves_the_current_step_and_exits_0(chain):
  assert chain['sigterm_rc'] == 0, train_runs.log_tail(chain['logs'][0])
  steps, last_logged, names = chain['after_sigterm']
  # The step being trained when the signal came is saved: no update done is lost; it is in the
  # middle of the run (not a periodic checkpoint of a run that simply finished).
  assert max(steps) == last_logged < train_runs.NUM_STEPS
  assert all(name.isdigit() for name in names), names  # No unfinished save left behind.
  assert f'Stopping after step {last_logged} (preemption)' in read(chain['logs'][0])
  assert f'Resumed from checkpoint step {last_logged} ' in read(chain['logs'][1])


def test_sigkill_then_same_command_resumes_to_identical_params(chain, config, reference):
  assert chain['sigkill_rc'] == -signal.SIGKILL
  latest = max(chain['after_sigkill'])
  assert latest < train_runs.NUM_STEPS
  assert chain['final_rc'] == 0, train_runs.log_tail(chain['logs'][2])
  assert f'Resumed from checkpoint step {latest} ' in read(chain['logs'][2])
  assert_same_state(train_runs.restore_state(config, chain['workdir'], train_runs.NUM_STEPS),
                    train_runs.restore_state(config, reference, train_runs.NUM_STEPS))


def test_same_config_same_losses_run_to_run(chain, reference):
  # Three processes trained pieces of the chain's run; every step's metrics equal the
  # uninterrupted run's exactly (metrics.jsonl keeps each step once).
  assert train_runs.train_losses(chain['workdir']) == train_runs.train_losses(reference)
  assert train_runs.eval_losses(chain['workdir']) == train_runs.eval_losses(reference)


def truncate_array_files(step_dir):
  """Cuts every array data file of the checkpoint's model item in half. (One file is not enough:
  an OCDBT data file can end in bytes no key references, and then restore still succeeds.)"""
  files = glob.glob(os.path.join(step_dir, 'model', 'ocdbt.process_*', 'd', '*'))
  assert files, step_dir
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def test_damaged_latest_checkpoint_resumes_from_previous(chain, corpus, config, reference,
                                                         tmp_path, tmp_path_factory):
  workdir = str(tmp_path / 'run')
  shutil.copytree(chain['workdir'], workdir)
  steps = train_runs.finalized_steps(workdir)
  latest, previous = steps[-1], steps[-2]
  truncate_array_files(os.path.join(workdir, 'checkpoints', str(latest)))
  log = str(tmp_path / 'log.txt')
  proc = train_runs.start(corpus, workdir, log,
                          jax_cache=train_runs.cache_dir(tmp_path_factory, 'single8'))
  try:
    assert train_runs.wait(proc, log) == 0, train_runs.log_tail(log)
  finally:
    train_runs.kill_all([proc])
  text = read(log)
  moved = os.path.join(workdir, 'checkpoints', f'{latest}.damaged')
  assert f'Checkpoint step {latest} in {workdir}/checkpoints is damaged' in text
  assert f'moved it to {moved}' in text
  assert f'Resumed from checkpoint step {previous} ' in text
  assert os.path.isdir(moved)  # Kept for inspection, not deleted.
  assert_same_state(train_runs.restore_state(config, workdir, train_runs.NUM_STEPS),
                    train_runs.restore_state(config, reference, train_runs.NUM_STEPS))


def test_losses_equal_on_1_2_4_8_devices(config, reference):
  """The 8-device reference run, continued from its step-4 checkpoint (parameters, optimizer and
  data iterator state) on meshes of 4, 2 and 1 devices (fsdp over all of them): every later
  step's loss is within 1e-5 of the reference's."""
  want = train_runs.train_losses(reference)
  start = 4
  ckpt = checkpoint.Checkpointer(reference, config.checkpoint, read_only=True)
  rules = sharding.logical_rules(config.mesh)
  try:
    for num_devices in (4, 2, 1):
      mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:num_devices])
      with sharding.activate(mesh, rules):
        setup = train_lib.make_setup(config, mesh, rules)
        batches = data.make_train_iterator(config)
        restored = ckpt.restore(start, model=setup.abstract_model,
                                opt_state=setup.abstract_opt_state, data_iter=batches)
        state = train_lib.TrainState(
            step=jax.device_put(np.int32(start), setup.state_shardings.step),
            params=restored['model']['params'], rest=restored['model']['rest'],
            opt_state=restored['opt_state'])
        train_step = train_lib.make_train_step(config, setup)
        got = {}
        for step in range(start + 1, train_runs.NUM_STEPS + 1):
          state, metrics = train_step(state, evaluation.global_batch(next(batches),
                                                                     setup.batch_sharding))
          got[step] = float(metrics['loss'])
      np.testing.assert_allclose(list(got.values()), [want[s] for s in got], rtol=0, atol=1e-5,
                                 err_msg=f'{num_devices} devices')
  finally:
    ckpt.close()


@pytest.mark.parametrize('make_unwritable', ['parent is a file', 'checkpoints is a file'])
def test_unwritable_workdir_fails_before_training(config, tmp_path, monkeypatch,
                                                  make_unwritable):
  if make_unwritable == 'parent is a file':
    (tmp_path / 'file').write_text('')
    workdir = tmp_path / 'file' / 'run'
  else:
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('')

  def not_reached(*args, **kwargs):
    raise AssertionError('training started')

  monkeypatch.setattr(train_lib, 'make_setup', not_reached)
  with pytest.raises(ValueError, match=re.escape(f'workdir={str(workdir)!r} is not writable')):
    train_lib.train_and_evaluate(config, str(workdir))
