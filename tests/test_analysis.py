"""Analyses: exact unrolled matrices (Pre-Norm, a permutation A_r), Amax gain (mHC vs HC), the
collapse cosine against the decoder's own hidden states, and the checkpoint path (JSON + PNG) on a
tiny trained model."""

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

import helpers
from configs import base, lm, paper
from hyperconn_jax import connections as connections_lib
from hyperconn_jax import checkpoint, sweep, train_lib
from hyperconn_jax.analysis import depth, diagnostics, gradients, loading, runner, trace
from hyperconn_jax.models import build_model

TOKENS_BxL = np.random.RandomState(0).randint(0, 256, (2, 16))
WEIGHTS_BxL = np.ones((2, 16), np.float32)


def loop_model(arg):
  """An untrained tiny model in the loop layout (2 blocks = 4 sub-layers)."""
  config = lm.get_config(arg + ',size=tiny')
  return trace.loop_layout(build_model(config.model, nnx.Rngs(0)), config.model)


def connections(model):
  return [node for _, node in nnx.iter_graph(model)
          if isinstance(node, connections_lib.connection_types())]


def tokens_of(model):
  return diagnostics.select_tokens(trace.trace(model, TOKENS_BxL), WEIGHTS_BxL)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny HC x2 run of 10 steps (one checkpoint): its workdir."""
  root = tmp_path_factory.mktemp('analysis')
  config = helpers.tiny_config(helpers.write_corpus(str(root / 'corpus')), str(root / 'tfds'),
                               num_steps=10, eval_every=10, checkpoint_every=10)
  workdir = str(root / 'run')
  train_lib.train_and_evaluate(config, workdir)
  return workdir


def test_prenorm_matrix_is_all_ones_lower_triangle():
  tokens = tokens_of(loop_model('connection=residual'))
  result = diagnostics.connection_matrices(tokens)
  expected = np.tril(np.ones((5, 5)))
  np.testing.assert_allclose(result['C0'], expected)
  np.testing.assert_allclose(result['C_streams'], expected[None])
  gain = diagnostics.gain(tokens)
  np.testing.assert_allclose(gain['composite_forward'], 1.0)
  np.testing.assert_allclose(gain['composite_backward'], 1.0)


def test_frac_at_init_is_prenorm():
  result = diagnostics.connection_matrices(tokens_of(loop_model('connection=frac,m=2')))
  np.testing.assert_allclose(result['C0'], np.tril(np.ones((5, 5))), atol=1e-6)


def test_altup_at_init_is_prenorm():
  """P = I, g = 1: each block gets every sub-layer's output and the active one feeds T."""
  tokens = tokens_of(loop_model('connection=altup,n=2'))
  result = diagnostics.connection_matrices(tokens)
  np.testing.assert_allclose(result['C0'][:-1], np.tril(np.ones((5, 5)))[:-1], atol=1e-6)
  np.testing.assert_allclose(result['C0'][-1], 2.0, atol=1e-6)  # The sum of the 2 blocks.
  np.testing.assert_allclose(diagnostics.gain(tokens)['composite_forward'], 1.0, atol=1e-6)


def test_resi_dual_streams():
  """ResiDual's x_d stream (index 1) holds every earlier output with weight 1 (the all-ones
  triangle, output row included); the sub-layers read x_a (stream 0), a Post-Norm residual."""
  result = diagnostics.connection_matrices(tokens_of(loop_model('connection=resi_dual')))
  np.testing.assert_allclose(result['C_streams'][1], np.tril(np.ones((5, 5))), atol=1e-6)
  # Post-Norm: the embedding and the first sub-layer's output reach layer k >= 2 through the
  # same k - 1 norms, so with the same weight.
  np.testing.assert_allclose(result['C0'][1:-1, 0], result['C0'][1:-1, 1], rtol=1e-6)
  assert not np.allclose(result['C0'][2:-1, 0], 1.0)


def test_permutation_residual_gives_checkerboard():
  """Static HC x2 with A_r = swap, A_m = e_0 (read stream 0), B = (1, 0) (write stream 0)."""
  model = loop_model('connection=hc,n=2,dynamic=false')
  for conn in connections(model):
    conn.static_alpha[...] = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    conn.static_beta[...] = jnp.array([1.0, 0.0])
  result = diagnostics.connection_matrices(tokens_of(model))
  # Layer j's output sits in stream 0, then alternates with each swap (k - 1 - j swaps before
  # layer k reads stream 0). The embedding fills both streams; the output sums both.
  expected = np.zeros((5, 5))
  for k in range(1, 6):
    for j in range(k):
      if j == 0:
        expected[k - 1, j] = 2.0 if k == 5 else 1.0
      elif k == 5:
        expected[k - 1, j] = 1.0
      else:
        expected[k - 1, j] = float((k - 1 - j) % 2 == 0)
  np.testing.assert_allclose(result['C0'], expected, atol=1e-6)
  # Stream i of layer k's residual (after its swap) holds layer j's output iff k - j is even for
  # i = 0, odd for i = 1 (the output row reads the streams unswapped).
  for i in range(2):
    for k in range(1, 5):
      for j in range(1, k):
        assert result['C_streams'][i, k - 1, j] == pytest.approx(float((k - j) % 2 == i))
  gain = diagnostics.gain(tokens_of(model))
  np.testing.assert_allclose(gain['forward'], 1.0)  # A permutation neither grows nor shrinks.


def test_mhc_gain_stays_near_one_while_hc_grows():
  rng = np.random.RandomState(1)
  mhc_model = loop_model('connection=mhc,n=4')
  for conn in connections(mhc_model):
    conn.phi[...] = jnp.asarray(rng.normal(size=conn.phi.shape), jnp.float32)
    conn.bias[...] = jnp.asarray(3 * rng.normal(size=conn.bias.shape), jnp.float32)
    conn.gate_res[...] = jnp.asarray(1.0)
  hc_model = loop_model('connection=hc,n=4,dynamic=false')
  for conn in connections(hc_model):
    a = np.array(conn.static_alpha[...])
    a[:, 1:] = 1.2 * np.eye(4) + 0.1 * rng.uniform(size=(4, 4))
    conn.static_alpha[...] = jnp.asarray(a)
  mhc_gain = diagnostics.gain(tokens_of(mhc_model))
  hc_gain = diagnostics.gain(tokens_of(hc_model))
  # Rows sum to 1 exactly (Sinkhorn ends on them): forward gain 1. Columns of these spread logits
  # (bias std 3) are 20 iterations' balance from 1, a percent or so per layer, so the backward
  # gain (max column sum) compounds to about 1.05 here; HC's grows far more.
  np.testing.assert_allclose(mhc_gain['composite_forward'], 1.0, atol=1e-4)
  np.testing.assert_allclose(mhc_gain['composite_backward'], 1.0, atol=0.1)
  assert hc_gain['composite_forward'][-1] > 2.0
  assert np.all(np.diff(hc_gain['composite_forward']) > 0)
  # The single-layer gain of this A_r: row sums 1.2 + 0.1 * (a uniform sum over 4 entries).
  assert 1.2 < hc_gain['forward'][0] < 1.6


def test_collapse_matches_the_decoders_hidden_states():
  config = lm.get_config('connection=hc,n=2,size=tiny')
  model = build_model(config.model, nnx.Rngs(0))  # Scanned layout.
  hidden_Kx2xBxLxD = model.forward(jnp.asarray(TOKENS_BxL), return_hidden=True).hidden
  h = np.asarray(hidden_Kx2xBxLxD).reshape(-1, *hidden_Kx2xBxLxD.shape[2:])
  cos = np.sum(h[:-1] * h[1:], -1) / np.linalg.norm(h[:-1], axis=-1) / np.linalg.norm(h[1:],
                                                                                      axis=-1)
  tokens = tokens_of(trace.loop_layout(model, config.model))
  result = diagnostics.collapse(tokens)
  np.testing.assert_allclose(result['median'], np.median(cos.reshape(3, -1), axis=1), atol=1e-5)
  assert np.all(tokens['cosine'] >= -1) and np.all(tokens['cosine'] <= 1 + 1e-6)
  assert all(lo <= med <= hi for lo, med, hi in zip(result['p05'], result['median'],
                                                    result['p95']))


def test_analyze_checkpoint_writes_json_and_png(trained, tmp_path):
  result = runner.analyze_checkpoint(trained, 'latest', defaults=base.get_config(),
                                     num_batches=1)
  assert result['step'] == 10 and result['num_tokens'] > 0
  for name in runner.ANALYSES:
    for ext in ('json', 'png'):
      path = os.path.join(trained, 'analysis', f'{name}_10.{ext}')
      assert path in result['files'] and os.path.getsize(path) > 0
  with open(os.path.join(trained, 'analysis', 'connections_10.json')) as f:
    saved = json.load(f)['result']
  np.testing.assert_allclose(saved['C0'], result['connections']['C0'])
  assert np.asarray(saved['C0']).shape == (5, 5)  # Embedding + 4 sub-layers (+ the output row).
  assert np.asarray(saved['C_streams']).shape == (2, 5, 5)
  stats = result['coefficients']
  assert len(stats) == 4 and stats[0]['alpha']['shape'] == [2, 3]
  assert np.asarray(stats[0]['alpha']['p50']).shape == (2, 3)
  # Trained for 10 steps, the HC coefficients have moved away from their init.
  assert not np.allclose(result['connections']['C0'][:4, :4], np.tril(np.ones((4, 4))))
  # A rerun reads what was written instead of analysing again; it compares the same way.
  again = runner.read_written(os.path.join(trained, 'analysis'), '10')
  assert again['files'] == result['files'] and again['step'] == 10
  assert again['num_tokens'] == result['num_tokens']
  for name in runner.OVERLAYS:
    for key, value in result[name].items():
      np.testing.assert_allclose(again[name][key], value, rtol=1e-6)
  assert runner.read_written(os.path.join(trained, 'analysis'), '11') is None
  # Written from this checkpoint: reused for it, not for another run's checkpoint of step 10.
  source = checkpoint.fingerprint(trained, 10)
  assert source.startswith('10@') and checkpoint.fingerprint(trained, 11) is None
  assert runner.read_written(os.path.join(trained, 'analysis'), '10', source=source)
  assert runner.read_written(os.path.join(trained, 'analysis'), '10', source='10@1') is None
  paths = runner.compare({'a': result, 'b': again}, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == [
      'compare_collapse.json', 'compare_collapse.png', 'compare_gain.json', 'compare_gain.png']
  with pytest.raises(ValueError, match='unknown'):
    runner.check_analyses(['gains'])


def _direct_branch_norms(model, batch, num_layers):
  """Per sub-layer norms of jax.grad of the mean cross-entropy, written out independently."""
  def loss(model):
    logp = jax.nn.log_softmax(model(jnp.asarray(batch['inputs'])), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch['targets'])[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch['weights']) / jnp.sum(batch['weights'])
  grads = nnx.grad(loss)(model)
  norms = []
  for layer in range(num_layers):
    for part in ('attn', 'mlp'):
      if model.scan_layers:  # Stacked: block `layer` is index `layer` of each leaf.
        leaves = [g[layer] for g in jax.tree.leaves(grads['blocks'][part])]
      else:
        leaves = jax.tree.leaves(grads['blocks'][layer][part])
      norms.append(float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in leaves))))
  return norms


def test_depth_measure_gradient_norms_match_jax_grad(trained, tmp_path):
  # depth.measure: collapse and gain at the last step, gradients.checkpoint_gradient_norms at
  # initialisation and every kept checkpoint; written once, then read back.
  config = loading.load_config(trained, base.get_config())
  run = {'run': sweep.Run(paper, sweep.Corpus('c'), 'dhc2_L2', 0, trained, 'tiny'), 'seed': 0,
         'config': json.loads(config.to_json())}
  out = str(tmp_path / 'a')
  measured = depth.measure({'dhc2_L2': [run]}, {'dhc2_L2': out}, defaults=base.get_config(),
                           num_batches=1, log=lambda _: None)['dhc2_L2']
  norms = measured['gradients']
  assert sorted(norms) == [0, 10]  # Initialisation and the run's one checkpoint.
  assert len(measured['collapse']['median']) == 3 and len(measured['gain']['layer']) == 4
  init = build_model(config.model, nnx.Rngs(config.seed))  # What training starts from.
  batch = loading.validation_batches(config, 1)[0]
  np.testing.assert_allclose(norms[0]['branch'], _direct_branch_norms(init, batch, 2), rtol=1e-4)
  looped = gradients.gradient_norms(trace.loop_layout(init, config.model), config, [batch])
  np.testing.assert_allclose(looped['branch'], norms[0]['branch'], rtol=1e-5)  # Either layout.
  assert not np.allclose(norms[0]['branch'], norms[10]['branch'], rtol=1e-2)
  # HC x2 has connection weights in every sub-layer; the whole gradient holds more than those.
  assert all(c > 0 for c in norms[10]['connection']) and norms[10]['layer'] == [1, 2, 3, 4]
  assert norms[10]['total'] > np.sqrt(np.sum(np.square(norms[10]['branch'])))
  assert os.path.exists(os.path.join(out, depth.GRADIENTS_FILE))
  again = depth.measure({'dhc2_L2': [run]}, {'dhc2_L2': out}, defaults=base.get_config(),
                        num_batches=1, log=lambda _: None)['dhc2_L2']
  assert again['gradients'] == norms
  # Gradients written from another checkpoint of the same step (an earlier run) are not reused.
  grad_path = os.path.join(out, depth.GRADIENTS_FILE)
  with open(grad_path, 'w') as f:
    json.dump({'source': '10@1', 'norms': {'0': 'stale'}}, f)
  retrained = depth.measure({'dhc2_L2': [run]}, {'dhc2_L2': out}, defaults=base.get_config(),
                            num_batches=1, log=lambda _: None)['dhc2_L2']
  assert retrained['gradients'] == norms
  np.testing.assert_allclose(again['collapse']['median'], measured['collapse']['median'])


@pytest.mark.parametrize('model_kind', ['vit', 'moe'])
def test_other_models_at_init_give_the_hc_prenorm_matrix(model_kind):
  """HC x2 at init is Pre-Norm on each stream: all-ones rows, the output row sums 2 streams."""
  config = base.get_config()
  config.model = helpers.tiny_model('hc', n=2)
  config.model.update(vocab_size=256, mlp_dim=32)
  if model_kind == 'vit':
    config.model.name = 'vit'
    v = config.model.vit
    # As the image pipeline gives them: weights per example, the last one padding.
    images = np.random.RandomState(0).rand(3, v.image_size, v.image_size, v.channels)
    batch = {'inputs': images, 'weights': np.array([1.0, 1.0, 0.0], np.float32)}
  else:
    config.model.ffn = 'moe'
    config.model.moe.update(num_experts=4, top_k=2)
    batch = {'inputs': TOKENS_BxL, 'weights': WEIGHTS_BxL}
  model = trace.loop_layout(build_model(config.model, nnx.Rngs(0)), config.model)
  result = runner.analyze_model(model, [batch], ['connections', 'gain'])
  expected = np.tril(np.ones((5, 5)))
  expected[-1] = 2.0
  np.testing.assert_allclose(result['connections']['C0'], expected, atol=1e-6)
  np.testing.assert_allclose(result['gain']['composite_forward'], 1.0, atol=1e-6)
  assert result['num_tokens'] == (2 * 16 if model_kind == 'vit' else TOKENS_BxL.size)


def test_trace_rejects_the_scanned_layout():
  config = lm.get_config('connection=hc,n=2,size=tiny')
  model = build_model(config.model, nnx.Rngs(0))
  with pytest.raises(ValueError, match='loop layout'):
    trace.trace(model, TOKENS_BxL)
