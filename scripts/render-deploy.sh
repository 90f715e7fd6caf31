#!/usr/bin/env bash
# Regenerates deploy/rendered/<preset>/ from the Helm chart (deploy/chart/faas-async) for every
# preset, offline, with Helm's own engine. ./test.sh (scripts/check-deploy.sh) fails when the
# committed files differ from what this writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install-tools.sh" > /dev/null
"$root/.tools/venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/deploy/requirements.txt" >&2
exec "$root/.tools/venv/bin/python" "$root/scripts/deploy/manifests.py" render
