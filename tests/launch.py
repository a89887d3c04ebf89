"""`torchrun --standalone --nproc-per-node 2 -m nla_lens.cli ...` on the CPU (gloo), for the tests.

torchrun picks free ports by binding and releasing them; another process can take one in between.
A launch that fails with a port clash (and only that) is retried once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PORT_CLASH = ("EADDRINUSE", "address already in use")


def torchrun_cli(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "nla_lens.cli", *args]
    for attempt in range(2):
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        clash = any(sign in done.stderr for sign in _PORT_CLASH)
        if done.returncode == 0 or not clash or attempt == 1:
            break
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done
