"""A run that lives in a bucket, against a real GCS JSON API (the emulator of conftest.gcs_bucket).

One chain, everything in gs://: the dataset is prepared into a gs:// data_dir (built locally and
copied up), train.py trains with a gs:// workdir and is killed with SIGKILL once a checkpoint is
committed in the bucket, the same command resumes and finishes with the parameters and metrics
of the uninterrupted local reference run (bit for bit), eval.py and analyze.py read the run from
the bucket and write their results there, and a damaged newest checkpoint is set aside in the
bucket (copied to <step>.damaged, then deleted: objects cannot be renamed) while the previous
one restores.
"""

import importlib
import json
import signal

from etils import epath
import jax
import numpy as np

import train_runs
from configs import base
from hyperconn_jax import checkpoint, data, paths, rundir, sharding, train_lib
from hyperconn_jax.analysis import runner

STEP_DELAY = 0.3


def test_train_kill_resume_eval_analyze_recover_in_a_bucket(gcs_bucket, tmp_path_factory):
  local_corpus = train_runs.prepared_corpus(tmp_path_factory)
  reference = train_runs.reference_run(tmp_path_factory)
  corpus = (local_corpus[0], f'{gcs_bucket}/tfds')
  workdir = f'{gcs_bucket}/runs/run1'
  config = train_runs.make_config(corpus)
  data.ensure_prepared(config)  # Into the bucket.
  assert any(p.name == 'dataset_info.json' for p in paths.files_under(epath.Path(corpus[1])))

  root = tmp_path_factory.mktemp('gcs')
  logs = [str(root / f'log{i}.txt') for i in range(2)]
  jax_cache = train_runs.cache_dir(tmp_path_factory, 'single8')
  procs = []
  try:
    procs.append(train_runs.start(corpus, workdir, logs[0], jax_cache=jax_cache,
                                  step_delay=STEP_DELAY))
    train_runs.wait_until(lambda: train_runs.finalized_steps(workdir), procs, 'a checkpoint',
                          logs[0])
    train_runs.send(procs[0], signal.SIGKILL)
    assert train_runs.wait(procs[0], logs[0]) == -signal.SIGKILL
    killed_at = max(train_runs.finalized_steps(workdir))
    assert killed_at < train_runs.NUM_STEPS
    procs.append(train_runs.start(corpus, workdir, logs[1], jax_cache=jax_cache))
    assert train_runs.wait(procs[1], logs[1]) == 0, train_runs.log_tail(logs[1])
  finally:
    train_runs.kill_all(procs)
  with open(logs[1]) as f:
    assert f'Resumed from checkpoint step {killed_at} ' in f.read()
  # Bit-exact resume: every step's metrics (each once) and the final state equal the reference's.
  assert train_runs.train_losses(workdir) == train_runs.train_losses(reference)
  assert train_runs.eval_losses(workdir) == train_runs.eval_losses(reference)
  final = train_runs.restore_state(config, workdir, train_runs.NUM_STEPS)
  for got, want in zip(jax.tree.leaves(final),
                       jax.tree.leaves(train_runs.restore_state(config, reference,
                                                                train_runs.NUM_STEPS)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  run = epath.Path(workdir)
  assert rundir.config_from_json(json.loads((run / 'config.json').read_text())).to_dict() == (
      config.to_dict())
  assert rundir.read_run_facts(workdir)['process_count'] == 1
  assert any((run / 'tensorboard').iterdir())

  # eval.py and analyze.py read the run from the bucket and write there.
  evaluated = importlib.import_module('eval').evaluate_checkpoint(workdir, 'latest',
                                                                  eval_batches=2)
  assert evaluated['step'] == train_runs.NUM_STEPS and np.isfinite(evaluated['eval_loss'])
  assert json.loads((run / f'eval_{train_runs.NUM_STEPS}.json').read_text()) == evaluated
  analysed = runner.analyze_checkpoint(workdir, 'latest', defaults=base.get_config(),
                                      analyses=('collapse',), num_batches=1)
  assert sorted(analysed['files']) == [f'{workdir}/analysis/collapse_{train_runs.NUM_STEPS}.json',
                                       f'{workdir}/analysis/collapse_{train_runs.NUM_STEPS}.png']
  assert all(epath.Path(p).stat().length > 0 for p in analysed['files'])

  # A damaged newest checkpoint: the previous one restores, the damaged one is set aside.
  steps = train_runs.finalized_steps(workdir)
  newest, previous = steps[-1], steps[-2]
  newest_dir = run / 'checkpoints' / str(newest)
  objects = [p.relative_to(newest_dir) for p in paths.files_under(newest_dir)]
  damaged = [p for p in paths.files_under(newest_dir / 'model') if p.parent.name == 'd']
  assert damaged
  for path in damaged:
    path.write_bytes(b'')  # Truncated array data files.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    try:
      step, restored = ckpt.restore_latest(model=setup.abstract_model,
                                           opt_state=setup.abstract_opt_state)
      assert step == previous and ckpt.all_steps()[-1] == previous
    finally:
      ckpt.close()
  want = train_runs.restore_state(config, reference, previous)
  for got, expected in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(want),
                           strict=True):
    np.testing.assert_array_equal(got, expected)
  aside = run / 'checkpoints' / f'{newest}{checkpoint.DAMAGED_SUFFIX}'
  assert not newest_dir.exists()
  assert [p.relative_to(aside) for p in paths.files_under(aside)] == objects
