"""Runs written before the per-kind connection sub-configs (a flat config.model.connection) still
load and restore: their config.json is migrated when read (connections.migrate), and the
parameter trees of every kind are unchanged."""

import json
import os

import numpy as np

import helpers
from configs import base
from hyperconn_jax import config_lib, connections, rundir, train_lib


def test_migrate_moves_each_field_to_the_kinds_that_read_it():
  old = helpers.OLD_CONNECTION
  new = connections.migrate(old)
  assert new['kind'] == 'mhc'
  assert new['mhc']['n'] == 2 and new['mhc']['reduce'] == 'head' and new['mhc']['index_base'] == 1
  assert new['hc']['n'] == 2 and new['hc']['dynamic'] and 'reduce' not in new['hc']
  assert new['frac'] == {k: old[k] for k in new['frac']} and new['frac']['m'] == 4
  assert set(new['altup']) == {'n', 'index_base'}
  assert connections.migrate(new) == new  # The per-kind layout passes through.


def test_a_run_with_the_old_layout_restores_and_evaluates(tmp_path):
  config = helpers.tiny_config(helpers.write_corpus(str(tmp_path / 'corpus')),
                               str(tmp_path / 'tfds'), num_steps=2, eval_every=2,
                               checkpoint_every=2)
  config.model.connection.kind = 'mhc'
  config.model.connection.mhc.update(n=2, reduce='head', index_base=1)
  workdir = str(tmp_path / 'run')
  trained = train_lib.train_and_evaluate(config, workdir)
  # Rewrite the run's config.json as the code before the per-kind sub-configs wrote it.
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['model']['connection'] = helpers.OLD_CONNECTION
  with open(path, 'w') as f:
    json.dump(saved, f)
  loaded = rundir.load_run_config(workdir, base.get_config())
  config_lib.validate(loaded)
  assert loaded.model.connection.kind == 'mhc'
  assert loaded.model.connection.mhc.to_dict() == config.model.connection.mhc.to_dict()
  import eval as eval_main  # pylint: disable=g-import-not-at-top  (the eval.py entry point)
  evaluated = eval_main.evaluate_checkpoint(workdir, 'latest')
  np.testing.assert_allclose(evaluated['eval_loss'], trained['eval_loss'], rtol=1e-5)
