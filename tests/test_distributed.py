"""Multi-process start-up: which launches initialise jax.distributed, and with what.

The cluster environments are simulated (environment variables, TPU chips on PCI, the Cloud TPU
metadata server); jax.distributed.initialize itself is replaced by a recorder. The real
two-process start-up is tests/test_multiprocess.py.
"""

import pytest

from hyperconn_jax import distributed

# Every variable cluster_environment reads.
_CLUSTER_VARS = (
    'JAX_COORDINATOR_ADDRESS', 'TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES',
    'MEGASCALE_COORDINATOR_ADDRESS', 'MEGASCALE_NUM_SLICES', 'TPU_SKIP_MDS_QUERY',
    'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID',
    'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE', 'KUBERNETES_SERVICE_HOST',
    'JOB_COMPLETION_INDEX')
_SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-4]', 'SLURM_PROCID': '0',
          'SLURM_LOCALID': '0'}


@pytest.fixture
def cluster(monkeypatch):
  """A plain machine (no cluster variables, no TPU chips, a metadata server that must not be
  asked) and a recorder of jax.distributed.initialize calls; returns (setenv, tpu_vm, calls)."""
  for name in _CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))

  def no_metadata(key):
    raise AssertionError(f'metadata server queried for {key!r} on a machine without TPU chips')

  monkeypatch.setattr(distributed.hardware_utils, 'num_available_tpu_chips_and_device_id',
                      lambda: (0, None))
  monkeypatch.setattr(distributed.cloud_tpu_cluster, 'get_metadata', no_metadata)

  def tpu_vm(endpoints, tpu_env=''):
    """Simulates a Cloud TPU VM host whose slice has the given worker-network-endpoints."""
    metadata = {'worker-network-endpoints': endpoints, 'tpu-env': tpu_env}
    monkeypatch.setattr(distributed.hardware_utils, 'num_available_tpu_chips_and_device_id',
                        lambda: (4, None))
    monkeypatch.setattr(distributed.cloud_tpu_cluster, 'get_metadata',
                        lambda key: (metadata[key], 200))

  def setenv(env):
    for name, value in env.items():
      monkeypatch.setenv(name, value)

  return setenv, tpu_vm, calls


@pytest.mark.parametrize('env,expected', [
    ({}, None),
    (dict(_SLURM, SLURM_NTASKS='1'), None),
    (dict(_SLURM, SLURM_NTASKS='4'), 'SLURM'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, None),  # Not a job step (no srun): JAX ignores it.
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}, 'Cloud TPU on GKE (TPU_WORKER_HOSTNAMES)'),
    ({'TPU_PROCESS_ADDRESSES': 'h0:8476,h1:8476'}, 'Cloud TPU on GKE (TPU_PROCESS_ADDRESSES)'),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'h0'}, 'Cloud TPU multislice'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'JAX_COORDINATOR_ADDRESS'),
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:3', 'OMPI_COMM_WORLD_SIZE': '2'}, 'Open MPI'),
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:3', 'OMPI_COMM_WORLD_SIZE': '1'}, None),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, None),  # Not started by mpirun: JAX's detector needs the URI.
])
def test_environment_variables(cluster, env, expected):
  setenv, _, calls = cluster
  setenv(env)
  assert distributed.cluster_environment() == expected
  assert distributed.maybe_initialize() is (expected is not None)
  # Detected launches let JAX find the coordinator, count and index itself.
  assert calls == ([{}] if expected else [])


@pytest.mark.parametrize('endpoints,tpu_env,expected', [
    ('10.0.0.2', '', None),  # A single-host TPU VM (e.g. v5e-8): runs alone.
    ('10.0.0.2', "MEGASCALE_NUM_SLICES: '2'", 'Cloud TPU VM slice (metadata server)'),
    ('10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5', '', 'Cloud TPU VM slice (metadata server)'),
    ('w-0:0:10.0.0.2,w-1:1:10.0.0.3', '', 'Cloud TPU VM slice (metadata server)'),  # Old format.
])
def test_cloud_tpu_vm_slice_from_metadata(cluster, endpoints, tpu_env, expected):
  setenv, tpu_vm, calls = cluster
  tpu_vm(endpoints, tpu_env)
  assert distributed.cluster_environment() == expected
  assert distributed.maybe_initialize() is (expected is not None)
  assert calls == ([{}] if expected else [])
  setenv({'TPU_SKIP_MDS_QUERY': '1'})  # JAX's own switch for "not a GCE TPU VM".
  assert distributed.cluster_environment() is None


def test_explicit_flags_override_detection(cluster):
  setenv, tpu_vm, calls = cluster
  setenv(dict(_SLURM, SLURM_NTASKS='4'))
  tpu_vm('h0,h1')
  assert distributed.maybe_initialize('10.0.0.9:1234', 2, 1) is True
  assert distributed.maybe_initialize('', 0, 0) is True  # process_id 0 is explicit, -1 is not.
  assert calls == [{'coordinator_address': '10.0.0.9:1234', 'num_processes': 2, 'process_id': 1},
                   {'process_id': 0}]
