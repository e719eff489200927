"""avmae.host_memory: XLA's per-call buffers reuse freed memory instead of faulting in pages."""

import os
import subprocess
import sys

import pytest

# A jitted call whose 256 MiB temporary (a dot's operand) XLA allocates on a worker thread and
# frees when the call ends; prints the page faults of the second call.
_SCRIPT = """
import resource, sys
from avmae import host_memory
if sys.argv[1] == "keep":
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: (jnp.tile(x, (64, 1)) @ w).sum())
x, w = jnp.ones((2 ** 16, 16)) + 0.5, jnp.ones((16, 16))
f(x, w).block_until_ready()  # compiles, and faults the temporary in once
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _second_call_faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults():
  pages = 256 * 2**20 // 4096  # of the temporary alone
  fresh, kept = _second_call_faults("fresh"), _second_call_faults("keep")
  assert fresh > pages // 2, fresh  # glibc maps it anew: every page faults
  assert kept < pages // 20, (kept, fresh)
