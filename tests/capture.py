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


def _dumps(script: str) -> tuple[str, str]:
    """Runs ``script`` with XLA dumping; returns (optimised HLO, thunk sequences)."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                            " --xla_gpu_graph_min_graph_size=1").strip()
        subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, check=True,
                       timeout=600)

        def read(pattern):
            texts = []
            for path in sorted(glob.glob(os.path.join(dump, pattern))):
                with open(path) as f:
                    texts.append(f"==> {os.path.basename(path)}\n{f.read()}")
            return "\n".join(texts)

        return read("*after_optimizations.txt"), read("*thunk_sequence_after_thunk_passes.txt")


def assert_captured(script: str, target: str) -> None:
    """Asserts a command-buffer thunk in the dumps of ``script`` holds a call to ``target``."""
    hlo, thunks = _dumps(script)
    assert thunks, "no thunk-sequence dump was written (is this jax >= 0.11 on a GPU?)"
    names = re.findall(r"%?([\w.\-]+) = [^\n]*custom_call_target=\"" + re.escape(target) + '"', hlo)
    assert names, f"no custom call to {target} in the optimised HLO:\n{hlo[:4000]}"
    # A command buffer thunk lists the thunks it holds on the lines below it.
    blocks = [b for b in re.split(r"\n(?=\S)", thunks) if re.search(r"command.?buffer", b, re.I)]
    captured = [n for n in names if any(re.search(re.escape(n) + r"\b", b) for b in blocks)]
    assert captured, (f"{target} ({names}) not inside a command buffer; thunk dumps:\n"
                      f"{thunks[:8000]}")
