"""The ahead-of-time pod check (hyperconn_jax.aot): clear errors before compiling, and the real
train step compiled for a 4-chip TPU v5e slice with libtpu on this CPU machine."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import lm
from hyperconn_jax import aot
from hyperconn_jax.models import sizes

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="libtpu is not installed (pip install -r requirements-test.txt -c constraints.txt)")


def _tiny(**fields):
  config = lm.get_config('connection=hc,n=4,size=tiny')
  for path, value in fields.items():
    section, leaf = path.split('__')
    config[section][leaf] = value
  return config


@pytest.mark.parametrize('name, message', [
    ('v5p-128', 'generation:AxB'),        # Cloud's accelerator-type name, not a topology.
    ('v9:2x2', 'generation:AxB'),         # Unknown generation.
    ('v5e:2x2x2', 'v5e takes 2 sizes'),   # v5e slices are 2-D.
    ('v5p:4x4', 'v5p takes 3 sizes'),
])
def test_bad_topology_name_is_a_clear_error(name, message):
  with pytest.raises(ValueError, match=message):
    aot.analyze(_tiny(), name)


@pytest.mark.parametrize('fields, message', [
    (dict(mesh__shape=(3, -1, 1)), r'mesh.shape.*do not divide the 4 devices'),
    (dict(mesh__shape=(2, 1, 1)), r'mesh.shape.*has 2 devices, but 4 are available'),
    (dict(train__batch_size=6, optim__grad_accum_steps=1), r'train.batch_size.*6 .*4 shards'),
    (dict(train__batch_size=8, optim__grad_accum_steps=4),
     r'train.batch_size.*= 2\) must be divisible by the 4 shards'),
])
def test_mesh_or_batch_that_does_not_divide_is_a_clear_error(fields, message):
  with pytest.raises(ValueError, match=message):
    aot.analyze(_tiny(**fields), 'v5e:2x2')


@needs_libtpu
def test_libtpu_rejects_an_impossible_slice_before_compiling():
  with pytest.raises(ValueError, match="topology='v5e:3x3' is rejected by libtpu"):
    aot.analyze(_tiny(train__batch_size=9, optim__grad_accum_steps=1), 'v5e:3x3')


@needs_libtpu
def test_compiles_the_train_step_for_a_v5e_slice(tmp_path):
  """The command line end to end: 3 layers (scanned) and 2 microbatches, so the FLOPs counted
  through the unrolled probes must scale to the real depth and accumulation."""
  out = tmp_path / 'aot.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'hyperconn_jax.aot',
       '--config=configs/lm.py:connection=hc,n=4,size=tiny', '--config.model.num_layers=3', '--config.optim.grad_accum_steps=2', '--topology=v5e:2x2',
       f'--json={out}'],
      cwd=_REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'v5e:2x2 (4 x TPU v5 lite), mesh data=1 x fsdp=4 x tensor=1' in proc.stdout
  r = json.loads(out.read_text())
  assert (r['num_chips'], r['device_kind'], r['chip']) == (4, 'TPU v5 lite', 'v5e')
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert (r['global_batch'], r['grad_accum_steps'], r['per_chip_microbatch']) == (8, 2, 1)
  config = _tiny(model__num_layers=3)
  # Parameters and two Adam moments in float32, sharded over the 4 chips, are a lower bound.
  state_bytes = 3 * 4 * sizes.count_params(config.model) / 4
  assert state_bytes < r['peak_bytes'] < r['hbm_bytes'] and r['fits']
  assert r['peak_bytes'] == (r['argument_bytes'] + r['output_bytes'] + r['temp_bytes']
                             - r['alias_bytes'])
  # XLA also counts elementwise work and the optimizer: a little above the matmul formula.
  assert 0.9 < r['xla_flops_per_chip'] / r['model_flops_per_chip'] < 1.4, r
  assert r['roofline_step_s'] == max(r['roofline_compute_s'], r['roofline_memory_s']) > 0
  assert r['roofline_compute_s'] == pytest.approx(r['xla_flops_per_chip'] / 197e12)
