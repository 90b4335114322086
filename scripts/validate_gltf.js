#!/usr/bin/env node
// Runs the Khronos glTF validator (installed by scripts/install_gltf_validator.sh into
// tools/node/) on one .glb/.gltf file and prints the JSON report on stdout.
// Exit status: 0 = no errors, 1 = the asset has validation errors, 2 = usage / install /
// read problem (so callers can tell "bad asset" from "could not validate").
"use strict";
const fs = require("fs");
const path = require("path");

const repoRoot = path.resolve(__dirname, "..");
const validatorDir = path.join(repoRoot, "tools", "node", "node_modules", "gltf-validator");

function fail(message) {
    process.stderr.write(`validate_gltf.js: ${message}\n`);
    process.exit(2);
}

if (process.argv.length !== 3) {
    fail("usage: node scripts/validate_gltf.js ASSET.glb");
}
if (!fs.existsSync(validatorDir)) {
    fail(`gltf-validator not found at ${validatorDir}; run scripts/install_gltf_validator.sh`);
}
const validator = require(validatorDir);
const assetPath = path.resolve(process.argv[2]);
let asset;
try {
    asset = fs.readFileSync(assetPath);
} catch (err) {
    fail(`cannot read asset ${assetPath}: ${err.message}`);
}

// External buffers/images (.gltf with separate files) are resolved next to the asset.
const loadExternal = (uri) => new Promise((resolve, reject) => {
    const resourcePath = path.resolve(path.dirname(assetPath), decodeURIComponent(uri));
    fs.readFile(resourcePath, (err, data) => (err ? reject(err.toString()) : resolve(data)));
});

validator.validateBytes(new Uint8Array(asset), {
    uri: path.basename(assetPath),
    maxIssues: 0, // 0 = report every issue
    externalResourceFunction: loadExternal,
}).then((report) => {
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
    process.exit(report.issues.numErrors > 0 ? 1 : 0);
}, (err) => fail(`validator rejected ${assetPath}: ${err}`));
