#!/bin/sh
# Start or resume the purification sweeps (issue 22 item 4) in the background at the lowest priority; extra arguments go to the command (e.g. --copy).
cd "$(dirname "$0")/../.." && mkdir -p runs/sweeps && nice -n 19 .venv/bin/python -m experiments.sweeps.purification_sweep --threads 1 "$@" >> runs/sweeps/purification.log 2>&1 &
