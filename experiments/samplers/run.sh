#!/bin/sh
# Start or resume ADDT-vs-base under each sampler (issue 22 item 3) in the background at the lowest priority;
# extra arguments go to the command (e.g. --units edm, --copy).
cd "$(dirname "$0")/../.." && mkdir -p runs && nice -n 19 .venv/bin/python -m experiments.samplers.compare --threads 1 "$@" >> runs/samplers.log 2>&1 &
