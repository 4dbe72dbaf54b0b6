"""train.py's operability options in one real run: the persistent compilation cache (a config
path), the profiler window (a trace under WORKDIR/profile) and model TFLOP/s / MFU in the logs."""

import glob
import os

import train_runs
from hyperconn_jax import devices

NUM_STEPS = 4


def test_compilation_cache_profile_window_and_mfu(tmp_path, tmp_path_factory):
  corpus = train_runs.prepared_corpus(tmp_path_factory)
  workdir, cache = str(tmp_path / 'run'), str(tmp_path / 'xla_cache')
  log_path = str(tmp_path / 'log.txt')
  # jax_cache='': no cache from the environment, so only the config field can enable it.
  proc = train_runs.start(corpus, workdir, log_path, jax_cache='', extra_flags=(
      f'--config.train.compilation_cache_dir={cache}', '--config.train.profile_start_step=1',
      '--config.train.profile_num_steps=2', f'--config.train.num_steps={NUM_STEPS}'))
  try:
    assert train_runs.wait(proc, log_path) == 0, train_runs.log_tail(log_path)
  finally:
    train_runs.kill_all([proc])
  assert glob.glob(os.path.join(cache, 'jit_train_step*')), os.listdir(cache)
  # TensorBoard's profile plugin / XProf layout.
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with open(log_path) as f:
    assert 'Profile of updates 2-3 written to' in f.read()
  rows = [r for r in train_runs.rows(workdir) if 'loss' in r]
  assert len(rows) == NUM_STEPS
  for r in rows:
    assert r['tflops_per_device'] > 0 and 0 < r['mfu'] < 2, r
  # Their ratio is the peak FLOP/s, a matmul measured once per process on CPU.
  peaks = [r['tflops_per_device'] / r['mfu'] for r in rows]
  assert max(peaks) / min(peaks) < 1 + 1e-9


def test_peak_flops_table():
  assert devices.chip('TPU v5 lite').name == 'v5e' and devices.chip('TPU v5').name == 'v5p'
  assert devices.chip('TPU v4').hbm_bytes == 32 * 2**30
  assert devices.chip('TPU v6 lite').peak_flops == 918e12
  assert devices.chip('NVIDIA H100 80GB HBM3').name == 'H100'
  assert devices.chip('NVIDIA H200').hbm_bytes == 141e9
  assert devices.chip('NVIDIA A100-SXM4-80GB').peak_flops == 312e12
  assert devices.chip('cpu') is None
  measured = devices.measured_matmul_flops()
  assert measured > 1e8 and devices.measured_matmul_flops() is measured  # Measured once.
