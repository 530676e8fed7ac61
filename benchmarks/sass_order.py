"""The order of a kernel's tensor-core, wait, exponential, pack and spill instructions.

Runs on the development machine (no GPU): ``cuobjdump --dump-sass`` of a binary or
cubin, one line of markers per function whose name contains the given text, runs of a
marker collapsed (``EX2x66@a8c0``: 66 MUFU.EX2 from address 0xa8c0 on). A pipelined
softmax overlaps the MMAs only if its EX2 sit between ``DEPBAR0x1`` (the wait for S)
and ``DEPBAR0x0`` (the wait for P V): ptxas may move them behind the second
(benchmarks/NOTES.md P43).

    python3 benchmarks/sass_order.py scratch/bin/pk_main prefill_ws_kernelI13__nv_bfloat16Li128ELb1
"""

import re
import subprocess
import sys


def marker(instruction):
    if "HGMMA" in instruction:
        # RS: the A operand in registers (P V); SS: both from shared memory (S = Q K^T).
        return "HGMMA RS" if re.search(r"HGMMA\S* R\d+, R\d+", instruction) else "HGMMA SS"
    if "WARPGROUP.DEPBAR" in instruction:
        return "DEPBAR" + instruction.split("gsb0,")[1].strip()
    if "MUFU.EX2" in instruction:
        return "EX2"
    if "F2FP" in instruction:
        return "F2FP"
    if re.match(r"(@!?U?P\w+ )?BRA\b", instruction):
        return "BRA"
    spill = re.match(r"(@!?U?P\w+ )?((LDL|STL)\S*)", instruction)
    return spill.group(2) if spill else None


def main(binary, name):
    sass = subprocess.run(["cuobjdump", "--dump-sass", binary], capture_output=True, text=True,
                          check=True).stdout
    for function in sass.split("Function : ")[1:]:
        if name not in function.split("\n", 1)[0]:
            continue
        runs = []  # [marker, count, first address]
        for address, instruction in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", function):
            m = marker(instruction)
            if m is None:
                continue
            if runs and runs[-1][0] == m:
                runs[-1][1] += 1
            else:
                runs.append([m, 1, address])
        print(function.split("\n", 1)[0].strip())
        print(" ".join(f"{m}x{n}@{a}" if n > 1 else f"{m}@{a}" for m, n, a in runs))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
