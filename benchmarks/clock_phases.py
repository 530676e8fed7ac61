"""Splits nvidia-smi samples (benchmarks/with_clocks.sh) by the stamped lines of the
command that ran meanwhile: for each line, since the line before, the SM clock
(median and minimum) over the samples in which the GPU was busy (utilisation of at
least 90%, else over all), the power draw (median), the busy share of the samples
and the clock event reasons seen.

    python3 clock_phases.py NAME.smi.csv NAME.lines
"""

import datetime
import statistics
import sys


def samples(path):
    """(unix time, SM MHz, watts, utilisation %, reasons bit mask) per nvidia-smi line."""
    out = []
    for line in open(path):
        fields = [f.strip() for f in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").astimezone()
            out.append((stamp.timestamp(), float(fields[1]), float(fields[2]), float(fields[3]),
                        int(fields[4], 16)))
        except (ValueError, IndexError):
            continue  # a partial last line, or a field nvidia-smi could not read
    return out


def main(smi_path, lines_path):
    rows = samples(smi_path)
    previous = rows[0][0] if rows else 0.0
    print(f"{'s':>7} {'MHz med':>7} {'MHz min':>7} {'W med':>6} {'busy':>5} {'reasons':>8}  line")
    for line in open(lines_path):
        stamp, _, text = line.rstrip("\n").partition(" ")
        t = float(stamp)
        window = [r for r in rows if previous <= r[0] < t]
        if window:
            busy = [r for r in window if r[3] >= 90] or window
            reasons = 0
            for r in window:
                reasons |= r[4]
            print(f"{t - rows[0][0]:7.2f} {statistics.median(r[1] for r in busy):7.0f} "
                  f"{min(r[1] for r in busy):7.0f} {statistics.median(r[2] for r in window):6.0f} "
                  f"{sum(r[3] >= 90 for r in window) / len(window):5.0%} {reasons:#8x}  {text}")
        else:
            print(f"{t - rows[0][0] if rows else 0:7.2f} {'':>7} {'':>7} {'':>6} {'':>5} {'':>8}  {text}")
        previous = t


if __name__ == "__main__":
    main(*sys.argv[1:3])
