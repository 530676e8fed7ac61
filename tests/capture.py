"""Proof that custom calls are captured into XLA command buffers (CUDA graphs).

On jax >= 0.11 command buffers are formed on the thunk sequence, after HLO
optimisation, so the HLO text never shows them. We run a script in a fresh
process with --xla_dump_to and read the dumped
``*thunk_sequence_after_thunk_passes.txt``: the custom call must appear
inside a command buffer thunk. Thunks are named after HLO instructions
(``ffi_call.3``), so the optimised HLO dump maps targets to those names.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile
import textwrap


def _dumps(script: str, module: str) -> tuple[str, str]:
    """Runs ``script`` with XLA dumping; returns (optimised HLO, thunk sequence) of jit_<module>."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                            " --xla_gpu_graph_min_graph_size=1").strip()
        subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, check=True,
                       timeout=600)

        def read(suffix):
            paths = sorted(glob.glob(os.path.join(dump, f"*.jit_{module}.*{suffix}")))
            assert paths, f"no dump *.jit_{module}.*{suffix}; found {sorted(os.listdir(dump))[:20]}"
            with open(paths[-1]) as f:
                return f.read()

        return read("after_optimizations.txt"), read("thunk_sequence_after_thunk_passes.txt")


def assert_captured(script: str, module: str, target: str) -> None:
    """Asserts every custom call of ``jit_<module>`` (run by ``script``) sits in a command buffer.

    The thunk dump names custom-call thunks only ``kCustomCall``, so the
    optimised HLO must show that the module's custom calls all start with ``target``.
    """
    hlo, thunks = _dumps(script, module)
    targets = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
    assert targets and all(t.startswith(target) for t in targets), (targets, hlo[:4000])
    # Top-level thunks start at column 0; the thunks a command buffer holds are indented under it.
    top_level = [line for line in thunks.splitlines() if re.match(r"\d+: ", line)]
    inside = [line for line in thunks.splitlines() if re.match(r"\s+\d+: kCustomCall", line)]
    assert not any("kCustomCall" in line for line in top_level), thunks
    assert any("kCommandBuffer" in line for line in top_level) and inside, thunks
