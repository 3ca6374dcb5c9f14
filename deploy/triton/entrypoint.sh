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
# The optional certify model (dbp.repository.OPTIONAL_MODELS) is served only once a version has weights/:
# tritonserver cannot leave a model directory out and does not start when one fails to load, so without weights it
# gets a view of the repository (symlinks to every other entry; polling still sees new versions), as dbp-triton does.
if [ -f "$repo/certify/config.pbtxt" ] && ! ls -d "$repo"/certify/[0-9]*/weights >/dev/null 2>&1; then
  view=$(mktemp -d /tmp/dbp-models.XXXXXX)
  for entry in "$repo"/*; do
    [ "$(basename "$entry")" = certify ] || ln -s "$entry" "$view/$(basename "$entry")"
  done
  echo "note: not serving $repo/certify: no version with weights/ yet (docs/certify.md, Serving)" >&2
  for arg in "$@"; do
    shift
    case "$arg" in --model-repository=*) set -- "$@" "--model-repository=$view" ;; *) set -- "$@" "$arg" ;; esac
  done
fi
exec "$@"
