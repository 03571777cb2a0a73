// A featmap client in Node.js, built from proto/featmap/v1/featmap.proto alone
// (@grpc/grpc-js + @grpc/proto-loader): Extract, RegisterPipeline, ExtractStream, an error
// with its featmap-field trailer, and image files sent as they are for the server to decode.
//
//   npm ci && node client.js 127.0.0.1:50051 < job.json > results.json
//
// job.json: {"spec": {...}, "tensor_spec": {...}, "weights": {"name": {"shape": [...],
// "values": [...]}}, "images": {"shape": [N, C, H, W], "values": [...]}} (float32 values),
// and optionally "files": {"paths": ["a.jpg", ...], "height": H, "width": W}: JPEG, PNG or
// WebP files sent as ExtractRequest.encoded, decoded and resized to H x W by the server.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "featmap", "v1", "featmap.proto");
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const featmap = grpc.loadPackageDefinition(definition).featmap.v1;

function tensor(array) {
  // float32, little-endian, row-major: what the proto says a Tensor is.
  const data = Buffer.alloc(array.values.length * 4);
  array.values.forEach((value, index) => data.writeFloatLE(value, index * 4));
  return { dtype: "FLOAT32", shape: array.shape, data };
}

function decoded(outputs) {
  const result = {};
  for (const [name, t] of Object.entries(outputs)) {
    if (t.dtype !== "FLOAT32") throw new Error(`${name}: unexpected dtype ${t.dtype}`);
    const values = [];
    for (let offset = 0; offset < t.data.length; offset += 4) values.push(t.data.readFloatLE(offset));
    result[name] = { shape: t.shape.map(Number), values };
  }
  return result;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 60000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function stream(client, requests) {
  return new Promise((resolve, reject) => {
    const call = client.ExtractStream({ deadline: Date.now() + 60000 });
    const responses = [];
    call.on("data", (response) => responses.push(response));
    call.on("error", reject);
    call.on("end", () => resolve(responses));
    for (const request of requests) call.write(request);
    call.end();
  });
}

async function main() {
  const address = process.argv[2];
  const job = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const client = new featmap.FeatureExtractor(address, grpc.credentials.createInsecure());
  const images = tensor(job.images);
  const results = {};

  const info = await unary(client, "GetServerInfo", {});
  results.server_version = info.version;

  const inline = await unary(client, "Extract", { spec_json: JSON.stringify(job.spec), images });
  results.inline = { pipeline_id: inline.pipeline_id, outputs: decoded(inline.outputs) };

  const weights = {};
  for (const [name, array] of Object.entries(job.weights)) weights[name] = tensor(array);
  const registered = await unary(client, "RegisterPipeline", {
    spec_json: JSON.stringify(job.tensor_spec),
    weights,
  });
  const byId = await unary(client, "Extract", { pipeline_id: registered.pipeline_id, images });
  results.registered = {
    pipeline_id: registered.pipeline_id,
    outputs: decoded(byId.outputs),
  };

  // Only the first message of a stream names the pipeline.
  const answers = await stream(client, [
    { pipeline_id: registered.pipeline_id, images },
    { images },
  ]);
  results.stream = answers.map((answer) => ({
    sequence: Number(answer.sequence),
    outputs: decoded(answer.outputs),
  }));

  if (job.files) {
    // The files' bytes as they are: the server decodes them as `featmap extract` does.
    const fs = require("fs");
    const encoded = {
      images: job.files.paths.map((file) => fs.readFileSync(file)),
      height: job.files.height,
      width: job.files.width,
    };
    const fromFiles = await unary(client, "Extract", { spec_json: JSON.stringify(job.spec), encoded });
    results.files = { outputs: decoded(fromFiles.outputs) };
  }

  const wrong = { dtype: "FLOAT32", shape: [1, 2, 4, 4], data: Buffer.alloc(2 * 16 * 4) };
  try {
    await unary(client, "Extract", { spec_json: JSON.stringify(job.spec), images: wrong });
    results.error = null;
  } catch (error) {
    results.error = {
      code: grpc.status[error.code],
      details: error.details,
      field: error.metadata.get("featmap-field")[0] || null,
    };
  }
  client.close();
  process.stdout.write(JSON.stringify(results));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
