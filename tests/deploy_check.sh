#!/usr/bin/env bash
# Checks the deployment files that cannot run here (no Docker daemon, no Grafana, no Slurm):
# - deploy/docker-compose.yml: `docker-compose config` (Debian's docker-compose) with every
#   profile, and its structure: the services, secrets from files, the provisioning it mounts;
# - both Dockerfiles: multi-stage, a non-root user and a HEALTHCHECK in the runtime stage, and
#   every Debian package from scripts/packages.txt through scripts/setup.sh;
# - the Prometheus config (promtool check config) and the Grafana provisioning and dashboard:
#   a panel and a query for each series of the metrics list, and the run variable;
# - the shell scripts parse.
# usage: deploy_check.sh SOURCE_DIR
# Exits 77 (skipped) when docker-compose or promtool is missing, after the other checks pass.
set -euo pipefail
src=$1
name=deploy-check
fail() { echo "$name: FAIL: $*"; exit 1; }
say() { echo "$name: $*"; }
python=/usr/bin/python3
"$python" -c 'import yaml' 2> /dev/null || python=python3
skipped=()

say "1. shell scripts parse"
for script in "$src"/deploy/*.sh "$src"/deploy/slurm/*.sbatch "$src"/docker/*.sh "$src"/scripts/*.sh; do
  bash -n "$script" || fail "$script does not parse"
done

say "2. Dockerfiles: multi-stage, non-root, HEALTHCHECK, packages from scripts/packages.txt"
for dockerfile in "$src"/docker/Dockerfile.cpu "$src"/docker/Dockerfile.cuda; do
  "$python" - "$dockerfile" "$src" <<'PY' || fail "$dockerfile (above)"
import re, subprocess, sys
path, src = sys.argv[1:]
text = open(path).read().replace("\\\n", " ")
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
stages = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
problems = []
if len(stages) < 2:
    problems.append("not multi-stage")
runtime = lines[stages[-1]:]
users = [l.split()[1] for l in runtime if l.upper().startswith("USER ")]
if not users or users[-1] in ("root", "0"):
    problems.append("the runtime stage does not run as a non-root user")
if not any(l.upper().startswith("HEALTHCHECK ") for l in runtime):
    problems.append("the runtime stage has no HEALTHCHECK")
# Every stage installs through setup.sh from the one package list; apt-get installs nothing
# else by name but the build's own runtime-packages.txt and unzip (for the LibTorch zip).
sections = subprocess.run(["sed", "-n", r"s/^\[\(.*\)\]$/\1/p", f"{src}/scripts/packages.txt"],
                          capture_output=True, text=True).stdout.split()
for start, end in zip(stages, stages[1:] + [len(lines)]):
    stage = lines[start:end]
    setups = [l for l in stage if "scripts/setup.sh" in l and l.upper().startswith("RUN ")]
    if not setups:
        problems.append(f"stage '{lines[start]}' does not install through scripts/setup.sh")
    if not any("packages.txt" in l for l in stage if l.upper().startswith("COPY ")):
        problems.append(f"stage '{lines[start]}' does not copy scripts/packages.txt")
    for l in setups:
        for m in re.finditer(r"setup\.sh((?: [a-z]+)*)", l):
            for section in m.group(1).split():
                if section not in sections:
                    problems.append(f"setup.sh section '{section}' is not in packages.txt")
    for l in stage:
        for m in re.finditer(r"apt-get install ([^&;]*)", l):
            named = [w for w in m.group(1).split() if not w.startswith("-") and not w.startswith("$(")]
            extra = [w for w in named if w not in ("unzip", "/opt/ddpm/runtime-packages.txt)")]
            if extra:
                problems.append(f"apt-get installs {extra} outside scripts/packages.txt")
for p in problems:
    print(f"  {path}: {p}")
sys.exit(1 if problems else 0)
PY
done

say "3. Compose: docker-compose config, services, secrets, mounts"
if command -v docker-compose > /dev/null; then
  (cd "$src/deploy" && docker-compose config -q && docker-compose --profile gpu --profile tools config -q) ||
    fail "docker-compose config refused deploy/docker-compose.yml"
else
  skipped+=("docker-compose config (Debian package 'docker-compose' is not installed)")
fi
"$python" - "$src" <<'PY' || fail "deploy/docker-compose.yml (above)"
import os, sys, yaml
src = sys.argv[1]
deploy = os.path.join(src, "deploy")
compose = yaml.safe_load(open(os.path.join(deploy, "docker-compose.yml")))
services = compose["services"]
problems = []
for needed in ("coordinator", "worker", "worker-gpu", "prometheus", "grafana"):
    if needed not in services:
        problems.append(f"no service {needed}")
if services.get("worker-gpu", {}).get("profiles") != ["gpu"]:
    problems.append("worker-gpu is not in the gpu profile")
gpu = services.get("worker-gpu", {}).get("deploy", {}).get("resources", {}).get("reservations", {})
if not any("gpu" in d.get("capabilities", []) for d in gpu.get("devices", [])):
    problems.append("worker-gpu reserves no GPU")
if "mpirun" not in " ".join(map(str, services.get("worker", {}).get("command", []))):
    problems.append("the worker group is not started with mpirun")
for name, service in services.items():
    for secret in service.get("secrets", []):
        if secret not in compose.get("secrets", {}):
            problems.append(f"{name} uses undefined secret {secret}")
    env = service.get("environment", {})
    for key, value in (env.items() if isinstance(env, dict) else []):
        if ("TOKEN" in key or "PASSWORD" in key) and not key.endswith("__FILE"):
            problems.append(f"{name} passes {key} in its environment, not as a secret")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            if not os.path.exists(os.path.join(deploy, source)):
                problems.append(f"{name} mounts {source}, which does not exist")
        elif source not in compose.get("volumes", {}):
            problems.append(f"{name} mounts undeclared volume {source}")
for name, secret in compose.get("secrets", {}).items():
    if not secret.get("file", "").startswith("./secrets/"):
        problems.append(f"secret {name} does not come from a file under deploy/secrets")
for needed in ("coordinator", "worker"):
    if "ddpm-data:/data" not in services.get(needed, {}).get("volumes", []):
        problems.append(f"{needed} does not mount the shared ddpm-data volume at /data")
# Prometheus scrapes the coordinator and the worker ranks.
prometheus = yaml.safe_load(open(os.path.join(deploy, "prometheus", "prometheus.yml")))
targets = [t for job in prometheus["scrape_configs"] for c in job.get("static_configs", [])
           for t in c["targets"]]
for needed in ("coordinator:9464", "worker:9500", "worker:9501"):
    if needed not in targets:
        problems.append(f"Prometheus does not scrape {needed}")
for p in problems:
    print("  ", p)
sys.exit(1 if problems else 0)
PY
if command -v promtool > /dev/null; then
  promtool check config "$src/deploy/prometheus/prometheus.yml" > /dev/null ||
    fail "promtool check config deploy/prometheus/prometheus.yml"
else
  skipped+=("promtool check config (Debian package 'prometheus' is not installed)")
fi

say "4. Grafana: provisioning and a dashboard panel for every series"
"$python" - "$src" <<'PY' || fail "deploy/grafana (above)"
import json, os, re, sys, yaml
src = sys.argv[1]
grafana = os.path.join(src, "deploy", "grafana")
datasources = yaml.safe_load(open(os.path.join(grafana, "provisioning", "datasources", "prometheus.yml")))
uids = {d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus"}
providers = yaml.safe_load(open(os.path.join(grafana, "provisioning", "dashboards", "ddpm.yml")))
compose = yaml.safe_load(open(os.path.join(src, "deploy", "docker-compose.yml")))
mounts = compose["services"]["grafana"]["volumes"]
problems = []
for provider in providers["providers"]:
    if f"./grafana/dashboards:{provider['options']['path']}:ro" not in mounts:
        problems.append(f"the dashboards provider reads {provider['options']['path']}, which Compose does not mount")
board = json.load(open(os.path.join(grafana, "dashboards", "ddpm.json")))
exprs = []
for panel in board["panels"]:
    if panel["type"] == "row":
        continue
    if panel.get("datasource", {}).get("uid") not in uids:
        problems.append(f"panel '{panel['title']}' uses a datasource that is not provisioned")
    targets = panel.get("targets", [])
    if not targets or not all(t.get("expr", "").strip() for t in targets):
        problems.append(f"panel '{panel['title']}' has no query")
    exprs += [t["expr"] for t in targets]
variables = {v["name"]: v for v in board["templating"]["list"]}
if "run" not in variables or "run" not in variables["run"].get("definition", ""):
    problems.append("no run template variable")
used = set(re.findall(r"ddpm_[a-z_]+", " ".join(exprs)))
# The metrics list of the observability issue; histograms count through their _bucket/_sum.
for series in ["ddpm_train_loss", "ddpm_train_step", "ddpm_train_images_per_second",
               "ddpm_train_learning_rate", "ddpm_train_grad_norm",
               "ddpm_train_loss_by_timestep_quartile", "ddpm_allreduce_seconds",
               "ddpm_allreduce_overlap_ratio", "ddpm_checkpoint_stall_seconds",
               "ddpm_checkpoint_write_seconds", "ddpm_eval_fid", "ddpm_eval_inception_score",
               "ddpm_eval_nll_bits_per_dim", "ddpm_eval_checkpoint_fid",
               "ddpm_eval_checkpoint_inception_score",
               "ddpm_run_state", "ddpm_runs", "ddpm_worker_up", "ddpm_worker_heartbeat_age_seconds",
               "ddpm_device_memory_bytes", "ddpm_grpc_requests_total"]:
    if not any(u == series or u.startswith(series + "_") and u[len(series) + 1:] in
               ("bucket", "sum", "count") for u in used):
        problems.append(f"no panel queries {series}")
for p in problems:
    print("  ", p)
sys.exit(1 if problems else 0)
PY

if [ ${#skipped[@]} -gt 0 ]; then
  for s in "${skipped[@]}"; do say "SKIPPED: $s"; done
  exit 77
fi
say "PASS"
