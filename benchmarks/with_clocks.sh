#!/usr/bin/env bash
# Runs a command while nvidia-smi samples the GPU's SM clock, power draw, utilisation and
# clock event (throttle) reasons every 20 ms, stamps each line the command prints with the
# time, and then prints, for each line, those samples since the line before
# (benchmarks/clock_phases.py), so that a figure can be read against the clock it ran
# at: under the card's power cap a long timing may run below the rest clock
# (benchmarks/NOTES.md P53). nvidia-smi's clock is coarse; clock64 in a kernel
# gives the effective rate (P56).
#
#   OUT=dir bash benchmarks/with_clocks.sh NAME COMMAND [ARG...]
# writes $OUT/NAME.smi.csv (the samples) and $OUT/NAME.lines (the stamped output).
# A phase that includes compilation mixes idle samples in; the busy ones have high
# utilisation.
set -u
[ $# -ge 2 ] || { echo "usage: OUT=dir $0 NAME COMMAND [ARG...]" >&2; exit 2; }
name=$1
shift
out=${OUT:-.}
smi="$out/$name.smi.csv" lines="$out/$name.lines"
# Reasons (a bit mask): 0x1 idle, 0x4 software power cap, 0x8 hardware slowdown,
# 0x20 software thermal slowdown, 0x40 hardware thermal, 0x80 power brake. Older
# drivers name the field clocks_throttle_reasons.
fields=timestamp,clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$fields --format=csv > /dev/null 2>&1 || fields=${fields/event/throttle}
nvidia-smi --query-gpu=$fields --format=csv,noheader,nounits -lms 20 > "$smi" &
sampler=$!
# stdbuf: a C program's printf to a pipe would otherwise reach us only at its exit.
line_buffered=()
command -v stdbuf > /dev/null && line_buffered=(stdbuf -oL -eL)
${line_buffered[@]+"${line_buffered[@]}"} "$@" 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done > "$lines"
status=${PIPESTATUS[0]}
kill "$sampler"
wait "$sampler" 2>/dev/null
python3 "$(dirname "$0")/clock_phases.py" "$smi" "$lines"
exit "$status"
