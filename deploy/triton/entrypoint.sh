#!/bin/sh
# Give every version's model.py its .pyc before Triton starts: the python-backend stub writes one on first
# import otherwise, which changes the version directory, and a polling server then reloads every model once
# (a second torch start-up). Same reason as dbp's launcher (docs/serving.md); compileall skips up-to-date files.
# A read-only mounted repository takes no .pyc (nor can the stub write one there), so it is not an error.
set -e
repo=/models
for arg in "$@"; do
  case "$arg" in --model-repository=*) repo="${arg#--model-repository=}" ;; esac
done
python3 -m compileall -q "$repo" >/dev/null 2>&1 || echo "note: no .pyc written in $repo (read-only?)" >&2
exec "$@"
