"""Runs written before the per-kind connection sub-configs (a flat config.model.connection) still
load and restore: their config.json is migrated when read (connections.migrate), and the
parameter trees of every kind are unchanged."""

import json
import os

import numpy as np

import helpers
from hyperconn_jax import config_lib, connections, rundir, train_lib

# config.model.connection as config.json held it before the per-kind sub-configs (commit
# dc2bf9f), here for an mHC x2 run with the learned head.
OLD_CONNECTION = {
    'kind': 'mhc', 'n': 2, 'm': 4, 'dynamic': True, 'tanh': True, 'dynamic_norm': 'layernorm',
    'dynamic_norm_affine': False, 'scale': True, 'alpha_scale_init': 0.01, 'beta_scale_init': 0.01,
    'train_width': True, 'train_beta': True, 'index_base': 1, 'out_proj_sqrt_n': 'none',
    'sinkhorn_iters': 20, 'sinkhorn_eps': 1e-06, 'post_mult': 2.0, 'gate_init': 0.01,
    'res_init': 'identity', 'res_offdiag_logit': -4.0, 'pre_init': 'home', 'pre_off_home': 0.01,
    'mappings': ['pre', 'post', 'res'], 'reduce': 'head'}


def test_migrate_moves_each_field_to_the_kinds_that_read_it():
  new = connections.migrate(OLD_CONNECTION)
  assert new['kind'] == 'mhc'
  assert new['mhc']['n'] == 2 and new['mhc']['reduce'] == 'head' and new['mhc']['index_base'] == 1
  assert new['hc']['n'] == 2 and new['hc']['dynamic'] and 'reduce' not in new['hc']
  assert new['frac'] == {k: OLD_CONNECTION[k] for k in new['frac']} and new['frac']['m'] == 4
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
  saved['model']['connection'] = OLD_CONNECTION
  with open(path, 'w') as f:
    json.dump(saved, f)
  loaded = rundir.load_run_config(workdir)
  config_lib.validate(loaded)
  assert loaded.model.connection.kind == 'mhc'
  assert loaded.model.connection.mhc.to_dict() == config.model.connection.mhc.to_dict()
  import eval as eval_main  # pylint: disable=g-import-not-at-top  (the eval.py entry point)
  evaluated = eval_main.evaluate_checkpoint(workdir, 'latest')
  np.testing.assert_allclose(evaluated['eval_loss'], trained['eval_loss'], rtol=1e-5)
