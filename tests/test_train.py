"""End to end: the loss falls, eval.py, TensorBoard output, resume after preemption equals the
uninterrupted run bitwise, NaN stops the run without saving the broken state, config errors."""

import glob
import json
import os
import signal
import struct

import jax
import numpy as np
import pytest

import helpers
from hyperconn_jax import checkpoint, config_lib, data, evaluation, rundir, sharding, train_lib

NUM_STEPS = 30


class HookedIterator:
  """Wraps a grain iterator (checkpointable through the byte-state protocol of grain's orbax
  handler) and calls hook(batch_index, batch) on each batch before returning it."""

  def __init__(self, inner, hook):
    self._inner, self._hook, self._count = inner, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    self._count += 1
    return self._hook(self._count, batch)

  def get_state(self):
    return json.dumps(self._inner.get_state()).encode()

  def set_state(self, state):
    self._inner.set_state(json.loads(state.decode()))

  def start_prefetch(self):
    pass


def hook_data(monkeypatch, hook):
  make = data.make_train_iterator
  monkeypatch.setattr(data, 'make_train_iterator',
                      lambda *a, **k: HookedIterator(make(*a, **k), hook))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  return helpers.write_corpus(str(root / 'corpus')), str(root / 'tfds')


@pytest.fixture(scope='module')
def full_run(corpus, tmp_path_factory):
  """An uninterrupted run of NUM_STEPS steps: (config, workdir, result)."""
  config = helpers.tiny_config(*corpus, num_steps=NUM_STEPS)
  workdir = str(tmp_path_factory.mktemp('full'))
  return config, workdir, train_lib.train_and_evaluate(config, workdir)


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_loss_falls_and_outputs_written(full_run):
  config, workdir, result = full_run
  rows = read_rows(workdir)
  train_rows = [r for r in rows if 'loss' in r]
  eval_rows = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in train_rows] == list(range(5, NUM_STEPS + 1, 5))
  assert [r['step'] for r in eval_rows] == [10, 20, 30]
  assert train_rows[-1]['loss'] < train_rows[0]['loss'] - 1.0
  assert eval_rows[-1]['eval_loss'] < eval_rows[0]['eval_loss']
  assert set(train_rows[0]) >= {'loss', 'z_loss', 'grad_norm', 'lr', 'tokens', 'tokens_per_sec'}
  assert result['step'] == NUM_STEPS and result['eval_loss'] == eval_rows[-1]['eval_loss']
  # Byte tokenizer: every token is one byte except the end-of-document id (0 bytes, ~1 in 60
  # tokens of this corpus), so bits per byte is slightly above loss / ln 2.
  ratio = eval_rows[-1]['eval_bits_per_byte'] / (eval_rows[-1]['eval_loss'] / np.log(2))
  assert 1.0 < ratio < 1.05
  with open(os.path.join(workdir, 'config.json')) as f:
    assert rundir.config_from_json(json.load(f)).to_dict() == config.to_dict()
  with open(os.path.join(workdir, 'run.json')) as f:
    facts = json.load(f)
  assert facts['backend'] == 'cpu' and facts['device_count'] == jax.device_count()
  assert facts['host']['cpu_count'] == os.cpu_count() and facts['versions']['jax'] == jax.__version__
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  assert ckpt.all_steps() == [20, 30]  # keep_latest=2; the best (lowest eval loss) is the last.
  assert ckpt.best_step() == 30
  ckpt.close()


def read_tensorboard(workdir):
  """Parses the event files with TensorBoard's record format (length, masked CRC32C, proto)."""
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto import event_pb2

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff

  scalars = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      blob = f.read()
    pos = 0
    while pos < len(blob):
      header = blob[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      assert struct.unpack('<I', blob[pos + 8:pos + 12])[0] == masked(header)
      payload = blob[pos + 12:pos + 12 + length]
      assert struct.unpack('<I', blob[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
      pos += 16 + length
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_events_readable(full_run):
  _, workdir, _ = full_run
  scalars = read_tensorboard(workdir)
  rows = {r['step']: r for r in read_rows(workdir) if 'loss' in r}
  assert sorted(scalars['loss']) == sorted(rows)
  np.testing.assert_allclose(scalars['loss'][30], rows[30]['loss'], rtol=1e-6)
  assert sorted(scalars['eval_loss']) == [10, 20, 30]


def test_eval_main_writes_json(full_run):
  import eval as eval_main
  from absl import flags
  _, workdir, result = full_run
  flags.FLAGS(['eval.py', f'--workdir={workdir}', '--step=best'])
  try:
    eval_main.main(['eval.py'])
  finally:
    flags.FLAGS.unparse_flags()
  with open(os.path.join(workdir, f'eval_{NUM_STEPS}.json')) as f:
    out = json.load(f)
  assert set(out) == {'step', 'eval_loss', 'eval_ppl', 'eval_bits_per_byte', 'eval_tokens',
                      'eval_batches'}
  assert out['step'] == NUM_STEPS
  np.testing.assert_allclose(out['eval_loss'], result['eval_loss'], rtol=1e-5)
  np.testing.assert_allclose(out['eval_ppl'], np.exp(out['eval_loss']), rtol=1e-6)


def restore_final(config, workdir, step):
  mesh_setup = {}
  from hyperconn_jax import sharding
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  with sharding.activate(mesh, rules):
    setup = train_lib.make_setup(config, mesh, rules)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
    restored = ckpt.restore(step, model=setup.abstract_model, opt_state=setup.abstract_opt_state)
    ckpt.close()
  del mesh_setup
  return jax.device_get(restored)


def test_preempt_and_resume_equals_uninterrupted(full_run, monkeypatch, tmp_path):
  config, full_workdir, full_result = full_run
  workdir = str(tmp_path / 'resumed')

  def preempt_at_7(index, batch):
    if index == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with monkeypatch.context() as m:
    hook_data(m, preempt_at_7)
    first = train_lib.train_and_evaluate(config, workdir)
  assert first['step'] == 7
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  assert ckpt.all_steps() == [7]
  ckpt.close()
  second = train_lib.train_and_evaluate(config, workdir)
  assert second['step'] == NUM_STEPS
  # Bitwise: same data order (restored iterator state), same compiled updates on CPU.
  got, want = restore_final(config, workdir, NUM_STEPS), restore_final(config, full_workdir,
                                                                        NUM_STEPS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert second['eval_loss'] == full_result['eval_loss']
  # metrics.jsonl holds each step once, with the uninterrupted run's values.
  rows = read_rows(workdir)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(5, NUM_STEPS + 1, 5))
  full_rows = {r['step']: r['loss'] for r in read_rows(full_workdir) if 'loss' in r}
  assert {r['step']: r['loss'] for r in rows if 'loss' in r} == full_rows


def test_nan_stops_run_and_keeps_last_good_checkpoint(corpus, monkeypatch, tmp_path):
  config = helpers.tiny_config(*corpus, num_steps=20, checkpoint_every=5)
  workdir = str(tmp_path / 'nan')

  def nan_at_10(index, batch):
    if index == 10:
      batch = dict(batch, weights=batch['weights'] * np.float32('nan'))
    return batch

  hook_data(monkeypatch, nan_at_10)
  with pytest.raises(train_lib.NonFiniteError, match='at step 10'):
    train_lib.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  assert ckpt.all_steps() == [5]
  ckpt.close()
  restored = restore_final(config, workdir, 5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


@pytest.mark.parametrize('field,value,message', [
    ('optim.schedule', 'linear', 'optim.schedule'),
    ('mesh.shape', (3, 1, 1), 'mesh.shape'),
    ('model.connection.kind', 'nope', 'connection.kind'),
])
def test_config_errors_before_compile(corpus, tmp_path, field, value, message):
  config = helpers.tiny_config(*corpus)
  section, _, name = field.rpartition('.')
  with config.unlocked():
    target = config
    for part in section.split('.'):
      target = target[part]
    target[name] = value
  workdir = tmp_path / 'bad'
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train_lib.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_eval_batch_size_is_its_own(corpus):
  """Evaluation runs in train.eval_batch_size batches (default: the training microbatch), not
  in training batches; the whole-split metrics do not depend on it."""
  results = {}
  for accum, eval_batch_size, expected_rows in ((2, 0, 4), (1, 0, 8), (1, 2, 2)):
    config = helpers.tiny_config(*corpus, eval_batches=0, eval_batch_size=eval_batch_size)
    with config.unlocked():
      config.optim.grad_accum_steps = accum
    data.ensure_prepared(config)
    first = next(data.make_eval_iterator(config, num_batches=0))
    assert first['inputs'].shape == (expected_rows, config.data.seq_len)
    rules = sharding.logical_rules(config.mesh)
    with config.unlocked():
      config.mesh.shape = (1, 2, 1)  # Any eval batch here (2, 4, 8) divides over 2 devices.
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:2])
    with sharding.activate(mesh, rules):
      setup = train_lib.make_setup(config, mesh, rules)
      state = train_lib.init_state(config, setup)
      evaluator = evaluation.Evaluator(config, setup.graphdef,
                                       {'params': setup.state_shardings.params,
                                        'rest': setup.state_shardings.rest},
                                       setup.batch_sharding)
      results[expected_rows] = evaluator({'params': state.params, 'rest': state.rest})
  assert results[4]['eval_tokens'] == results[8]['eval_tokens'] == results[2]['eval_tokens']
  np.testing.assert_allclose(results[4]['eval_loss'], results[8]['eval_loss'], rtol=1e-5)
  np.testing.assert_allclose(results[2]['eval_loss'], results[8]['eval_loss'], rtol=1e-5)
  with pytest.raises(ValueError, match=r'train\.eval_batch_size'):
    config_lib.validate(helpers.tiny_config(*corpus, eval_batch_size=-1))
