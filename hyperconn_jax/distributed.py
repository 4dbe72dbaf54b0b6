"""Multi-process start-up: jax.distributed.initialize() when (and only when) launched multi-process.

Called first thing by train.py / eval.py; never by library code or tests.

`cluster_environment` decides from the same signals JAX's cluster detectors (jax._src.clusters)
use, so `jax.distributed.initialize()` without arguments then finds the coordinator, the process
count and this process's index itself. A plain machine is never asked for cloud metadata: the
metadata server is only queried when TPU chips are attached over PCI (a Cloud TPU VM), which is
also where JAX's own GCE TPU detector queries it.
"""

import os
from typing import Callable

from absl import flags
from absl import logging
import jax
from jax._src import hardware_utils  # What JAX itself uses to find TPU chips on PCI.
from jax._src.clusters import cloud_tpu_cluster


def _env_int(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, str(default)).split('(')[0])
  except ValueError:
    return default


def _num_hosts(names: str) -> int:
  return len([h for h in names.split(',') if h.strip()])


def _tpu_vm_hosts() -> int:
  """Hosts of this Cloud TPU VM slice times its slices (metadata server), or 0 off a TPU VM.

  The metadata's 'worker-network-endpoints' lists the slice's hosts (what JAX's GceTpuCluster
  reads); 'tpu-env' holds MEGASCALE_NUM_SLICES for multislice.
  """
  if os.environ.get('TPU_SKIP_MDS_QUERY') is not None:
    return 0
  num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  if num_chips == 0:
    return 0
  endpoints, code = cloud_tpu_cluster.get_metadata('worker-network-endpoints')
  hosts = _num_hosts(endpoints) if code == cloud_tpu_cluster.metadata_response_code_success else 1
  slices = cloud_tpu_cluster.get_tpu_env_value('MEGASCALE_NUM_SLICES')
  return max(hosts, 1) * (int(slices) if slices and slices.isdigit() else 1)


def cluster_environment() -> str | None:
  """The multi-process launcher this process runs under, or None for a single process.

  Recognised, each only with more than one process:
    JAX_COORDINATOR_ADDRESS (set by hand; JAX reads it),
    a Cloud TPU slice on GKE (TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES) or any multislice
      (MEGASCALE_COORDINATOR_ADDRESS),
    a Cloud TPU VM slice launched with `gcloud ... ssh --worker=all` (no environment variables:
      the slice's hosts come from the metadata server, queried only when TPU chips are attached),
    SLURM (the variables JAX's SlurmCluster reads, SLURM_NTASKS > 1),
    Open MPI's mpirun (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE > 1),
    a Kubernetes indexed Job (KUBERNETES_SERVICE_HOST, JOB_COMPLETION_INDEX, and the
      `kubernetes` package JAX's K8sCluster needs).
  mpi4py is opt-in in JAX (jax.distributed.initialize(spec_detection_method='mpi4py')) and
  not detected; pass the explicit flags instead.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  for name in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    if _num_hosts(os.environ.get(name, '')) > 1:
      return f'Cloud TPU on GKE ({name})'
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'Cloud TPU multislice'
  if (all(name in os.environ for name in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
                                          'SLURM_PROCID', 'SLURM_LOCALID'))
      and _env_int('SLURM_NTASKS') > 1):
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  if 'KUBERNETES_SERVICE_HOST' in os.environ and 'JOB_COMPLETION_INDEX' in os.environ:
    try:
      import kubernetes  # pylint: disable=g-import-not-at-top,unused-import  (optional: jax[k8s])
    except ImportError:
      logging.warning('Kubernetes indexed Job without the `kubernetes` package: JAX cannot '
                      'detect the other processes (pip install jax[k8s], or pass '
                      '--coordinator_address/--num_processes/--process_id); running alone.')
    else:
      return 'Kubernetes indexed Job'
  if _tpu_vm_hosts() > 1:
    return 'Cloud TPU VM slice (metadata server)'
  return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialises jax.distributed for a multi-process launch; a no-op for a single process.

  Must run before any other JAX call.

  Args:
    coordinator_address: 'host:port' of process 0 (explicit launch), or None / ''.
    num_processes: total number of processes (explicit launch), or None / 0.
    process_id: this process's index (explicit launch), or None / -1.

  Returns:
    True if jax.distributed is initialised (now or before), False for a single process.
  """
  if jax.distributed.is_initialized():
    return True
  # Processes on CPU run their cross-process collectives over TCP with gloo (jax 0.10.2's default,
  # made explicit: without an implementation a multi-process CPU run has none).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  explicit = {k: v for k, v in (('coordinator_address', coordinator_address or None),
                                ('num_processes', num_processes or None),
                                ('process_id', None if process_id in (None, -1) else process_id))
              if v is not None}
  if explicit:
    logging.info('Initialising jax.distributed with %s.', explicit)
    jax.distributed.initialize(**explicit)
    return True
  env = cluster_environment()
  if env is None:
    return False
  logging.info('Initialising jax.distributed (detected %s).', env)
  jax.distributed.initialize()
  return True


def define_flags() -> Callable[[], bool]:
  """Defines a launcher script's --coordinator_address, --num_processes and --process_id; returns
  a function that calls `maybe_initialize` with their values."""
  coordinator = flags.DEFINE_string(
      'coordinator_address', '', "Multi-process: 'host:port' of process 0 ('' = auto-detect).")
  num_processes = flags.DEFINE_integer(
      'num_processes', 0, 'Multi-process: number of processes (0 = auto-detect).')
  process_id = flags.DEFINE_integer(
      'process_id', -1, 'Multi-process: index of this process (-1 = auto-detect).')
  return lambda: maybe_initialize(coordinator.value, num_processes.value, process_id.value)
