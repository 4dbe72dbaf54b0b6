"""The connection protocol end to end: a kind defined and registered in this one file trains,
evaluates, is analysed and benchmarked, with no other file of the repository naming it.

The toy kind is a gated residual x + g T(x) with one learned scalar g per sub-layer (init
`gate_init`), one stream, and a config option of its own (model.connection.toy_gated.gate_init).
"""

import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import helpers
from configs import base
from hyperconn_jax import connections, flops, params, train_lib
from hyperconn_jax.analysis import runner
from hyperconn_jax.connections import checks, protocol

NAME = 'toy_gated'


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(gate_init=0.5))


def validate(cfg, d_model: int) -> None:
  del d_model
  checks.Fields(cfg, NAME).greater('gate_init', 0)


def _ones(x_BxLx1xD, rows=1, cols=1):
  return jnp.ones(x_BxLx1xD.shape[:-2] + (rows, cols), jnp.float32)


class Streams(nnx.Module):
  num_streams = 1

  def __init__(self, cfg, *, dim, norm_eps, rngs):
    del cfg, dim, norm_eps, rngs

  def expand(self, h_BxLxD):
    return h_BxLxD[..., None, :]

  def reduce(self, x_BxLx1xD):
    return x_BxLx1xD[..., 0, :]

  def ends(self, x_BxLx1xD):
    return _ones(x_BxLx1xD), _ones(x_BxLx1xD)


class Connection(nnx.Module):
  branch_prenorm = True

  def __init__(self, cfg, *, dim, sublayer_index, norm_kind, norm_eps, rngs):
    del dim, sublayer_index, norm_kind, norm_eps, rngs
    self.gate = params.HCStatic(jnp.asarray(cfg.gate_init, jnp.float32), out_sharding=())

  def __call__(self, x_BxLx1xD, branch):
    h_BxLxD = x_BxLx1xD[..., 0, :]
    return (h_BxLxD + self.gate[...].astype(h_BxLxD.dtype) * branch(h_BxLxD))[..., None, :]

  def hc_form(self, x_BxLx1xD, h_BxLxD, y_BxLxD):
    del h_BxLxD, y_BxLxD
    gate_BxL = jnp.broadcast_to(self.gate[...].astype(jnp.float32), x_BxLx1xD.shape[:-2])
    one = _ones(x_BxLx1xD)
    return {'extract': one, 'res': one, 'inject': gate_BxL[..., None, None]}, {'gate': gate_BxL}


KIND = protocol.Kind(name=NAME, defaults=defaults, validate=validate,
                     layout=protocol.single_stream, Streams=Streams, Connection=Connection,
                     extra_flops=lambda cfg, d_model: protocol.ExtraFlops(d_model))


@pytest.fixture
def registered():
  """The kind registered for one test (other tests' configs do not see it)."""
  connections.register(KIND)
  try:
    yield
  finally:
    del connections.KINDS[NAME]


def test_a_kind_from_one_file_trains_evaluates_analyses_and_benchmarks(registered, tmp_path):
  assert base.get_config().model.connection[NAME].gate_init == 0.5
  config = helpers.tiny_config(helpers.write_corpus(str(tmp_path / 'corpus')),
                               str(tmp_path / 'tfds'), num_steps=10, eval_every=10,
                               checkpoint_every=10)
  config.model.connection.kind = NAME
  # Validation names the kind's own field.
  config.model.connection[NAME].gate_init = 0.0
  with pytest.raises(ValueError, match=rf'model\.connection\.{NAME}\.gate_init'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'bad'))
  config.model.connection[NAME].gate_init = 0.5

  workdir = str(tmp_path / 'run')
  trained = train_lib.train_and_evaluate(config, workdir)
  assert trained['step'] == 10 and np.isfinite(trained['eval_loss'])

  import eval as eval_main  # pylint: disable=g-import-not-at-top  (the eval.py entry point)
  evaluated = eval_main.evaluate_checkpoint(workdir, 'latest')
  np.testing.assert_allclose(evaluated['eval_loss'], trained['eval_loss'], rtol=1e-5)

  analysed = runner.analyze_checkpoint(workdir, 'latest', defaults=base.get_config(),
                                       num_batches=1)
  c0 = np.asarray(analysed['connections']['C0'])
  assert c0.shape == (5, 5) and np.all(np.isfinite(c0))
  # Each sub-layer's output enters the stream with its gate (trained away from 0.5).
  gates = [np.asarray(stats['gate']['p50']) for stats in analysed['coefficients']]
  assert len(gates) == 4 and not np.allclose(gates, 0.5)
  np.testing.assert_allclose(c0[1, 0], 1.0, rtol=1e-6)  # The embedding reaches sub-layer 1.
  np.testing.assert_allclose(c0[2, 1], gates[0], rtol=1e-5)  # Sub-layer 1 reaches sub-layer 2.

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import bench  # pylint: disable=g-import-not-at-top
  variant, = bench.parse_variants(f'Toy={NAME}/gate_init=0.25', [1])
  bench_config = bench.make_config(variant, d=32, layers=2, seq=16, batch=2, remat_policy='none')
  assert bench_config.model.connection[NAME].gate_init == 0.25
  assert bench.skip_reason(bench_config) is None
  wall_s, _ = bench.Compiled(bench_config, allocate=True).run()
  assert wall_s > 0
  baseline = bench.make_config(bench.BASELINE_VARIANT, d=32, layers=2, seq=16, batch=2,
                               remat_policy='none')
  # The kind's extra FLOPs (d per sub-layer and token) enter the model FLOPs: 3 x 2 x 2 x 32 x 32.
  assert (flops.model_flops_per_step(bench_config) - flops.model_flops_per_step(baseline)
          == 3 * 2 * 2 * 32 * 16 * 2)
