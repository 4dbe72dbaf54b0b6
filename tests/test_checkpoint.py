"""Checkpoints: retention (latest N + best N by eval loss, persisting across re-opening), step
selection, unfinished / damaged steps (each kind of damage falls back to the previous step),
the process count a resume needs, writability, and restoring onto other meshes."""

import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import helpers
from hyperconn_jax import checkpoint, evaluation, rundir, sharding, train_lib


def checkpoint_config(keep_latest=2, keep_best=1, keep_every=0, async_save=True):
  return ml_collections.ConfigDict(dict(keep_latest=keep_latest, keep_best=keep_best,
                                        keep_every=keep_every, async_save=async_save))


def small_items(value):
  model = {'params': nnx.State({'w': jnp.full((4,), value, jnp.float32)}), 'rest': nnx.State({})}
  iterator = iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())
  next(iterator)
  return dict(model=model, opt_state={'count': jnp.asarray(0, jnp.int32)}, data_iter=iterator,
              config_json={'seed': 0}, meta={})


def abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def test_keep_latest_and_best_and_metrics_persist(tmp_path):
  config = checkpoint_config(keep_latest=2, keep_best=2)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  losses = {1: 3.0, 2: 1.0, 3: None, 4: 0.5, 5: 2.5, 6: None, 7: 4.0}
  for step, loss in losses.items():
    ckpt.save(step, **small_items(float(step)),
              metrics=None if loss is None else {'eval_loss': loss, 'eval_ppl': np.exp(loss)})
  ckpt.wait()
  # Latest 2 (6, 7) and best 2 by eval loss (4: 0.5, 2: 1.0); 3 had no metrics and is not latest.
  assert ckpt.all_steps() == [2, 4, 6, 7]
  assert ckpt.best_step() == 4
  ckpt.close()

  reopened = checkpoint.Checkpointer(str(tmp_path), config)
  assert reopened.all_steps() == [2, 4, 6, 7]
  assert reopened.best_step() == 4
  assert reopened.metrics(2)['eval_loss'] == 1.0
  assert reopened.metrics(6) is None
  assert reopened.resolve_step('best') == 4
  assert reopened.resolve_step('latest') == 7
  assert reopened.resolve_step('2') == 2
  with pytest.raises(ValueError, match='available steps'):
    reopened.resolve_step(3)
  # Saving more keeps the ranking built before the restart: 8 (1.5) is not among the best 2.
  reopened.save(8, **small_items(8.0), metrics={'eval_loss': 1.5})
  reopened.wait()
  assert reopened.all_steps() == [2, 4, 7, 8]
  template = small_items(0.0)
  restored = reopened.restore(4, model=abstract(template['model']), data_iter=template['data_iter'])
  np.testing.assert_array_equal(restored['model']['params']['w'], np.full((4,), 4.0))
  # The iterator continues after the one batch consumed before saving.
  np.testing.assert_array_equal(next(template['data_iter']), [2, 3])
  reopened.close()


def test_keep_every(tmp_path):
  """Every 4th step is kept besides the latest 2 and the best 1, also across a restart."""
  config = checkpoint_config(keep_latest=2, keep_best=1, keep_every=4)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  losses = {2: 1.0, 4: 3.0, 6: 2.0, 8: 4.0, 10: 5.0}
  for step, loss in losses.items():
    ckpt.save(step, **small_items(float(step)), metrics={'eval_loss': loss})
  ckpt.wait()
  # Multiples of 4: 4, 8; latest 2: 8, 10; best: 2 (1.0). 6 is none of them.
  assert ckpt.all_steps() == [2, 4, 8, 10]
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path), config)
  for step in (12, 14, 16):
    reopened.save(step, **small_items(float(step)), metrics={'eval_loss': 9.0})
  reopened.wait()
  assert reopened.all_steps() == [2, 4, 8, 12, 14, 16]
  reopened.close()
  # Without keep_every the same saves keep only the latest 2 and the best.
  plain = checkpoint.Checkpointer(str(tmp_path / 'plain'), checkpoint_config(keep_latest=2))
  for step, loss in losses.items():
    plain.save(step, **small_items(float(step)), metrics={'eval_loss': loss})
  plain.wait()
  assert plain.all_steps() == [2, 8, 10]
  plain.close()


def test_unfinished_and_damaged_steps(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), checkpoint_config(keep_latest=3, keep_best=0))
  for step in (1, 2):
    ckpt.save(step, **small_items(float(step)))
  ckpt.wait()
  ckpt.close()
  # A save interrupted before its rename: orbax's temporary directory is not a step.
  os.makedirs(tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234' / 'model')
  reopened = checkpoint.Checkpointer(str(tmp_path), checkpoint_config(keep_latest=3, keep_best=0))
  assert reopened.all_steps() == [1, 2] and reopened.latest_step() == 2
  # A damaged step fails loudly, naming itself.
  model_dir = tmp_path / 'checkpoints' / '2' / 'model'
  for root, _, files in os.walk(model_dir):
    for name in files:
      os.remove(os.path.join(root, name))
  template = small_items(0.0)
  with pytest.raises(RuntimeError, match='checkpoint step 2'):
    reopened.restore(2, model=abstract(template['model']))
  reopened.close()


@pytest.fixture(scope='module')
def trained_on_2x2x2(tmp_path_factory):
  """A short run on a (data 2, fsdp 2, tensor 2) mesh of the 8 simulated devices."""
  root = tmp_path_factory.mktemp('mesh')
  config = helpers.tiny_config(helpers.write_corpus(str(root / 'corpus')), str(root / 'tfds'),
                               num_steps=4, eval_every=4, checkpoint_every=4)
  with config.unlocked():
    config.mesh.shape = (2, 2, 2)
  workdir = str(root / 'run')
  result = train_lib.train_and_evaluate(config, workdir)
  return config, workdir, result


def eval_on(config, workdir, devices, shape):
  """Restores the run's last checkpoint (model only) onto a mesh of `devices` and evaluates it."""
  config = rundir.config_from_json(rundir.config_to_json(config))
  config.mesh.shape = shape
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  rules = sharding.logical_rules(config.mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  with sharding.activate(mesh, rules):
    graphdef, target, _ = checkpoint.abstract_model_state(config.model, mesh, rules)
    model = ckpt.restore(ckpt.latest_step(), model=target)['model']
    shardings = jax.tree.map(lambda x: x.sharding, target)
    for leaf, want in zip(jax.tree.leaves(model), jax.tree.leaves(shardings)):
      assert leaf.sharding == want
    result = evaluation.Evaluator(config, graphdef, shardings,
                                  sharding.batch_sharding(mesh, rules))(model)
  ckpt.close()
  return model, result


@pytest.mark.parametrize('num_devices,shape', [(1, (1, 1, 1)), (8, (1, 8, 1))])
def test_restore_on_other_mesh(trained_on_2x2x2, num_devices, shape):
  config, workdir, trained = trained_on_2x2x2
  model, result = eval_on(config, workdir, jax.devices()[:num_devices], shape)
  np.testing.assert_allclose(result['eval_loss'], trained['eval_loss'], rtol=1e-5)
  assert result['eval_tokens'] == trained['eval_tokens']
  if num_devices == 8:  # Really sharded: the token embedding is split over the 8-way fsdp axis.
    assert any(len(leaf.sharding.device_set) == 8 and
               leaf.addressable_shards[0].data.shape != leaf.shape
               for leaf in jax.tree.leaves(model))


def random_items(step):
  """small_items with a random 16 KB parameter (stored in an array file, not inline in orbax's
  manifest) that identifies the step, and the meta of a single-process run."""
  items = small_items(float(step))
  w = np.random.default_rng(step).standard_normal(4096).astype(np.float32)
  items['model'] = {'params': nnx.State({'w': jnp.asarray(w)}), 'rest': nnx.State({})}
  items['meta'] = {'process_count': 1}
  return items


def _truncate_array_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / 'model')
           for name in names if os.path.basename(root) == 'd']
  largest = max(files, key=os.path.getsize)
  assert os.path.getsize(largest) > 4096
  os.truncate(largest, os.path.getsize(largest) // 2)


DAMAGE = {
    'truncated array file': _truncate_array_file,
    'deleted array index': lambda step_dir: os.remove(step_dir / 'model' / 'manifest.ocdbt'),
    'deleted iterator state': lambda step_dir: os.remove(step_dir / 'data_iter' /
                                                         'process_0-of-1.json'),
    'missing commit marker': lambda step_dir: os.remove(step_dir / 'commit_success.txt'),
    'missing step metadata': lambda step_dir: os.remove(step_dir / '_CHECKPOINT_METADATA'),
    'missing item': lambda step_dir: shutil.rmtree(step_dir / 'data_iter'),
}


def targets():
  template = random_items(0)
  return dict(model=abstract(template['model']), opt_state=abstract(template['opt_state']),
              data_iter=template['data_iter'])


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_previous(tmp_path, caplog, damage):
  config = checkpoint_config(keep_latest=3, keep_best=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  for step in (1, 2, 3):
    ckpt.save(step, **random_items(step))
  ckpt.wait()
  ckpt.close()
  DAMAGE[damage](tmp_path / 'checkpoints' / '3')
  reopened = checkpoint.Checkpointer(str(tmp_path), config)
  target = targets()
  with caplog.at_level(logging.WARNING):
    step, restored = reopened.restore_latest(**target)
  assert step == 2
  np.testing.assert_array_equal(restored['model']['params']['w'],
                                random_items(2)['model']['params']['w'])
  np.testing.assert_array_equal(next(target['data_iter']), [2, 3])
  moved = tmp_path / 'checkpoints' / '3.damaged'
  assert f'Checkpoint step 3 in {tmp_path}/checkpoints is damaged' in caplog.text
  assert f'moved it to {moved}' in caplog.text
  assert moved.is_dir() and reopened.all_steps() == [1, 2]  # Kept aside, never deleted.
  # Training goes on and saves step 3 again.
  reopened.save(3, **random_items(3))
  reopened.wait()
  assert reopened.all_steps() == [1, 2, 3]
  reopened.close()


def test_nothing_restorable_moves_nothing(tmp_path):
  config = checkpoint_config(keep_latest=3, keep_best=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  for step in (1, 2):
    ckpt.save(step, **random_items(step))
  ckpt.wait()
  # A different model (e.g. the config changed): no step fits, and none is called damaged.
  target = targets()
  target['model'] = abstract({'params': nnx.State({'w': jnp.zeros((7,))}), 'rest': nnx.State({})})
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r'(?s)nothing was moved or deleted.*step 2: .*step 1: '):
    ckpt.restore_latest(**target)
  assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  ckpt.close()
  empty = checkpoint.Checkpointer(str(tmp_path / 'empty'), config)
  assert empty.restore_latest(**targets()) is None
  empty.close()


def test_resume_needs_the_process_count_that_saved(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), checkpoint_config())
  items = random_items(1)
  items['meta'] = {'process_count': 2}
  ckpt.save(1, **items)
  ckpt.wait()
  # As two processes would have saved it: one state file each, not per shard (a plain iterator).
  data_dir = tmp_path / 'checkpoints' / '1' / 'data_iter'
  state = (data_dir / 'process_0-of-1.json').read_text()
  (data_dir / 'process_0-of-1.json').unlink()
  for i in range(2):
    (data_dir / f'process_{i}-of-2.json').write_text(state)
  with pytest.raises(ValueError, match=r'written by 2 processes, but this run has 1.*cannot be '
                     r'redistributed.*fixed data.num_shards'):
    ckpt.restore_latest(**targets())
  # The model alone (eval) restores with any number of processes.
  target = targets()
  step, restored = ckpt.restore_latest(model=target['model'])
  assert step == 1
  np.testing.assert_array_equal(restored['model']['params']['w'], items['model']['params']['w'])
  ckpt.close()


def test_ensure_writable(tmp_path):
  rundir.ensure_writable(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path / 'new' / 'run' / 'checkpoints') == []  # The probe is removed.
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match=r"workdir='.*/file/run' is not writable"):
    rundir.ensure_writable(str(tmp_path / 'file' / 'run'))
