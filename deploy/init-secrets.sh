#!/usr/bin/env bash
# Makes the Compose stack's secrets once: the control, worker and console viewer tokens and Grafana's admin
# password, random, in deploy/secrets/ (which git ignores). Existing files are kept.
# The containers run as uid 10001, so the files are readable by all; the folder is not.
set -euo pipefail
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
for name in control.token worker.token viewer.token grafana_admin_password; do
  if [ -s "$dir/$name" ]; then echo "init-secrets: keeping $dir/$name"; continue; fi
  openssl rand -hex 32 > "$dir/$name"
  chmod 644 "$dir/$name"
  echo "init-secrets: wrote $dir/$name"
done
