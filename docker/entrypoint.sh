#!/bin/sh
# Container entrypoint: refuse to start `ovd serve` without a model export, then exec the command.
#
# The service itself verifies every file of the export against the sha256 in its manifest when it
# loads (ovd.models.exported.load_export); this check only turns a forgotten or empty volume mount into
# one clear line and exit status 78 (EX_CONFIG) instead of a traceback after the imports.
set -eu

if [ "${1:-}" = "ovd" ] && [ "${2:-}" = "serve" ]; then
  model_dir="${OVD_MODEL_DIR:-/models/default}"
  if [ ! -f "$model_dir/manifest.json" ]; then
    echo "ovd: no model export at OVD_MODEL_DIR=$model_dir (manifest.json missing)." >&2
    echo "ovd: mount an export folder read-only, e.g." \
      "docker run -v \"\$PWD/artifacts/default:$model_dir:ro\" ..." >&2
    exit 78
  fi
  for f in "$model_dir"/*; do
    if [ ! -r "$f" ]; then
      echo "ovd: $f is not readable by uid $(id -u) (the image's user)." >&2
      echo "ovd: make the export world-readable (chmod -R a+rX <folder>) or run with --user <its owner>." >&2
      exit 78
    fi
  done
fi
exec "$@"
