// Validates rendered Kubernetes manifests (a JSON array of objects on stdin): built-in kinds
// against the Kubernetes API's own schemas (npm's kubernetes-models), the MPIJob against
// tests/reference/mpijob-v2beta1.schema.json and its pod templates against PodTemplateSpec.
// Prints one line per object; exits 1 naming every object and field that does not validate.
// usage: node k8s_validate.js MODULES_DIR SCHEMA < manifests.json
const path = require("path");
const fs = require("fs");
const modules = process.argv[2];
const load = (name) => require(path.join(modules, "node_modules", name));
const Ajv = load("ajv");
const mpijobSchema = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
const objects = JSON.parse(fs.readFileSync(0, "utf8"));
const ajv = new Ajv({ allErrors: true, strict: false });
const validateMpiJob = ajv.compile(mpijobSchema);
const { PodTemplateSpec } = load("kubernetes-models/v1/PodTemplateSpec");
let failures = 0;
for (const object of objects) {
  const what = `${object.apiVersion} ${object.kind} ${object.metadata && object.metadata.name}`;
  try {
    if (object.apiVersion === "kubeflow.org/v2beta1" && object.kind === "MPIJob") {
      if (!validateMpiJob(object)) {
        throw new Error(ajv.errorsText(validateMpiJob.errors, { dataVar: "mpijob" }));
      }
      for (const [role, replica] of Object.entries(object.spec.mpiReplicaSpecs)) {
        try {
          new PodTemplateSpec(replica.template).validate();
        } catch (error) {
          throw new Error(`mpiReplicaSpecs.${role}.template: ${error.message}`);
        }
      }
    } else {
      const group = object.apiVersion.includes("/") ? object.apiVersion : object.apiVersion;
      let Model;
      try {
        Model = load(`kubernetes-models/${group}/${object.kind}`)[object.kind];
      } catch (error) {
        throw new Error(`no schema for this kind in kubernetes-models`);
      }
      new Model(object).validate();
    }
    console.log(`valid: ${what}`);
  } catch (error) {
    failures += 1;
    console.log(`INVALID: ${what}: ${error.message}`);
  }
}
process.exit(failures === 0 ? 0 : 1);
