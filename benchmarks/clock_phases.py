"""Splits nvidia-smi samples (benchmarks/with_clocks.sh) by the stamped lines of the
command that ran meanwhile: for each line, the SM clock (median and minimum), the
power draw (median) and the clock event reasons seen since the line before.

    python3 clock_phases.py NAME.smi.csv NAME.lines
"""

import datetime
import statistics
import sys


def samples(path):
    """(unix time, SM MHz, watts, reasons bit mask) per nvidia-smi line."""
    out = []
    for line in open(path):
        fields = [f.strip() for f in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").astimezone()
            out.append((stamp.timestamp(), float(fields[1]), float(fields[2]), int(fields[4], 16)))
        except (ValueError, IndexError):
            continue  # a partial last line, or a field nvidia-smi could not read
    return out


def main(smi_path, lines_path):
    rows = samples(smi_path)
    previous = rows[0][0] if rows else 0.0
    print(f"{'s':>7} {'MHz med':>7} {'MHz min':>7} {'W med':>6} {'reasons':>8}  line")
    for line in open(lines_path):
        stamp, _, text = line.rstrip("\n").partition(" ")
        t = float(stamp)
        window = [r for r in rows if previous <= r[0] < t]
        if window:
            reasons = 0
            for r in window:
                reasons |= r[3]
            print(f"{t - rows[0][0]:7.2f} {statistics.median(r[1] for r in window):7.0f} "
                  f"{min(r[1] for r in window):7.0f} {statistics.median(r[2] for r in window):6.0f} "
                  f"{reasons:#8x}  {text}")
        else:
            print(f"{t - rows[0][0] if rows else 0:7.2f} {'':>7} {'':>7} {'':>6} {'':>8}  {text}")
        previous = t


if __name__ == "__main__":
    main(*sys.argv[1:3])
