"""Programs on simulated CPU devices, for tests: the device count is an XLA flag read when jax initialises,
so a test session that already runs on one device starts a subprocess for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT = "RESULT "  # the prefix of the line a script prints its JSON result on


def run_on_simulated_devices(script: str, arguments: dict[str, list[str]], devices: int = 8,
                             timeout_s: float = 600) -> dict[str, dict]:
    """`python -c script ARGS...` once per key of `arguments`, side by side (compiling dominates and each compile
    uses one core), each on `devices` CPU devices; the JSON each prints after `RESULT ` on its last such line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # LLVM optimisation off: compiling dominates these short programs, and every run compiles alike
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
    runs = {key: subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            for key, args in arguments.items()}
    results = {}
    for key, run in runs.items():
        stdout, stderr = run.communicate(timeout=timeout_s)
        if run.returncode:
            raise AssertionError(f"the {key} run failed:\n{stderr[-4000:]}")
        line = [line for line in stdout.splitlines() if line.startswith(RESULT)][-1]
        results[key] = json.loads(line[len(RESULT):])
    return results
