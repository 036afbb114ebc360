#!/usr/bin/env node
'use strict';
// A deepzero-oracle solver served from Node.js: the advection-diffusion step of step.js behind
// the KServe v2 gRPC inference service (protos/oracle.proto; the contract is protos/README.md).
//
//   node server.js --port 0      ->  node-solver: serving 'advection_diffusion' at 127.0.0.1:PORT (...)
//   deepzero-oracle sol train --solver grpc://127.0.0.1:PORT ...
//
// The solver contract: step(state [N, C, H, W] FP64, params [N, 2] FP64) -> next_state [N, C, H, W]
// FP64. Inputs are matched by name when they are called state and params, else by position.

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { N_PARAMS, maxStableDt, step } = require('./step');
const { version } = require('./package.json');

const PROTO = path.join(__dirname, '..', '..', 'protos', 'oracle.proto');
// The KServe v2 service under its standard name, and under the name protos/oracle.proto gives it
// (its proto package is deepzero_oracle.v1); both answer with the same handlers.
const SERVICE_NAMES = ['inference.GRPCInferenceService', 'deepzero_oracle.v1.GRPCInferenceService'];
const TOKEN_ENV = 'DEEPZERO_ORACLE_TOKEN';
const MODEL_VERSION = '1';
const INPUTS = ['state', 'params'];
const OUTPUT = 'next_state';
const FP64_BYTES = 8;
const BIG_ENDIAN_HOST = os.endianness() === 'BE'; // the wire is little-endian
const Status = grpc.status;

const USAGE = `usage: node server.js [options]
  --port P             TCP port; 0 picks a free one (default 50051)
  --host H             interface to bind (default 127.0.0.1; 0.0.0.0 exposes the solver)
  --dt DT              time advanced by one call (default 0.02)
  --grid C,H,W         declare and enforce the state's channels and grid (default: any, -1)
  --model-name NAME    model name on the wire (default advection_diffusion)
  --max-message-mb MB  largest message received or sent, in MiB (default 64)
  --token T            shared token clients send as 'authorization: Bearer T'
                       (default: $${TOKEN_ENV}; no check when neither is set)
  --grace S            seconds running calls get to finish on SIGTERM (default 5)
  --help               show this text`;

/** A request the server refuses: `code` is the gRPC status to answer with. */
class RequestError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const invalid = (message) => new RequestError(Status.INVALID_ARGUMENT, message);

/** Command-line options, checked; exits with status 2 and the usage on bad ones. */
function parseOptions(argv) {
  const spec = {
    port: { type: 'string', default: '50051' },
    host: { type: 'string', default: '127.0.0.1' },
    dt: { type: 'string', default: '0.02' },
    grid: { type: 'string' },
    'model-name': { type: 'string', default: 'advection_diffusion' },
    'max-message-mb': { type: 'string', default: '64' },
    token: { type: 'string' },
    grace: { type: 'string', default: '5' },
    help: { type: 'boolean', default: false },
  };
  const fail = (message) => {
    console.error(`node-solver: error: ${message}\n${USAGE}`);
    process.exit(2);
  };
  let values;
  try {
    ({ values } = parseArgs({ args: argv, options: spec, strict: true }));
  } catch (e) {
    fail(e.message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const number = (flag, ok, what) => {
    const x = Number(values[flag]);
    if (values[flag].trim() === '' || !ok(x)) fail(`--${flag} ${values[flag]}: expected ${what}`);
    return x;
  };
  const grid = values.grid === undefined ? null : values.grid.split(',').map(Number);
  if (grid && (grid.length !== 3 || !grid.every((d) => Number.isSafeInteger(d) && d >= 1))) {
    fail(`--grid ${values.grid}: expected three positive integers C,H,W`);
  }
  return {
    port: number('port', (x) => Number.isInteger(x) && x >= 0 && x <= 65535, 'a port 0-65535'),
    host: values.host,
    dt: number('dt', (x) => Number.isFinite(x) && x > 0, 'a positive number'),
    grid,
    modelName: values['model-name'],
    maxMessageBytes: Math.floor(number('max-message-mb', (x) => x > 0, 'a positive number') * 2 ** 20),
    token: values.token ?? (process.env[TOKEN_ENV] || null),
    grace: number('grace', (x) => Number.isFinite(x) && x >= 0, 'seconds >= 0'),
  };
}

// -- tensors ------------------------------------------------------------------------------------

/** An FP64 input tensor (raw little-endian bytes or typed fp64_contents) -> {shape, values}. */
function decodeFp64(tensor, raw, label) {
  if (tensor.datatype !== 'FP64') {
    throw invalid(`${label} is ${tensor.datatype || 'without a datatype'}; this solver takes FP64 (float64)`);
  }
  const shape = tensor.shape.map(Number);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw invalid(`${label}: shape [${shape}] must hold integers from 0 to 2^53`);
  }
  const count = shape.reduce((product, d) => product * d, 1);
  const typed = Object.entries(tensor.contents || {}).filter(([, list]) => list.length);
  if (raw !== undefined) {
    if (typed.length) throw invalid(`${label} has both typed contents and raw_input_contents; send one`);
    if (raw.length !== count * FP64_BYTES) {
      throw invalid(`${label}: ${raw.length} bytes of raw contents, but shape [${shape}] of FP64 ` +
                    `needs ${count * FP64_BYTES}`);
    }
    return { shape, values: readFp64(raw) };
  }
  const wrong = typed.find(([field]) => field !== 'fp64_contents');
  if (wrong) throw invalid(`${label} of FP64 carries values in ${wrong[0]}; use fp64_contents`);
  const list = tensor.contents ? tensor.contents.fp64_contents : [];
  if (list.length !== count) {
    throw invalid(`${label}: ${list.length} values in fp64_contents, but shape [${shape}] needs ${count}`);
  }
  return { shape, values: Float64Array.from(list) };
}

/** Little-endian FP64 bytes -> a Float64Array (a copy: the bytes need not be 8-byte aligned). */
function readFp64(bytes) {
  const copy = new Uint8Array(bytes);
  if (BIG_ENDIAN_HOST) Buffer.from(copy.buffer).swap64();
  return new Float64Array(copy.buffer);
}

/** Float64Array -> flat little-endian bytes (the raw layout of an FP64 tensor). */
function encodeFp64(values) {
  const bytes = Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  return BIG_ENDIAN_HOST ? Buffer.from(bytes).swap64() : bytes;
}

// -- the model ----------------------------------------------------------------------------------

/** The served model: its name, declared grid (or null) and time step. */
function makeModel({ modelName, grid, dt }) {
  const stateShape = [-1, ...(grid || [-1, -1, -1])];
  return {
    name: modelName,
    grid,
    dt,
    metadata: {
      name: modelName,
      versions: [MODEL_VERSION],
      platform: 'nodejs',
      inputs: [
        { name: 'state', datatype: 'FP64', shape: stateShape },
        { name: 'params', datatype: 'FP64', shape: [-1, N_PARAMS] },
      ],
      outputs: [{ name: OUTPUT, datatype: 'FP64', shape: stateShape }],
    },
  };
}

/** The model a request names ('' = the only one); NOT_FOUND for any other name or version. */
function findModel(model, name, modelVersion) {
  if (name !== '' && name !== model.name) {
    throw new RequestError(Status.NOT_FOUND, `unknown model '${name}'; this server serves ['${model.name}']`);
  }
  if (modelVersion !== '' && modelVersion !== MODEL_VERSION) {
    throw new RequestError(Status.NOT_FOUND,
      `model '${model.name}' has no version '${modelVersion}'; it has ['${MODEL_VERSION}']`);
  }
  return model;
}

/** Shapes and values a step can take; every failure names the input, row and fix. */
function checkInputs(model, state, params) {
  const [rows, ...grid] = state.shape;
  if (state.shape.length !== 4 || !grid.every((d) => d >= 1)) {
    throw invalid(`state must be [N, C, H, W] with C, H, W >= 1; got shape [${state.shape}]`);
  }
  if (params.shape.length !== 2 || params.shape[1] !== N_PARAMS) {
    throw invalid(`params must be [N, ${N_PARAMS}] (rows of [nu, a]); got shape [${params.shape}]`);
  }
  if (params.shape[0] !== rows || rows < 1) {
    throw invalid(`state has ${rows} rows and params ${params.shape[0]}; send the same N >= 1 rows`);
  }
  if (model.grid && grid.join() !== model.grid.join()) {
    throw invalid(`state has C, H, W = ${grid}, but this server was started with --grid ${model.grid}`);
  }
  for (const [name, { values }] of [['state', state], ['params', params]]) {
    for (let i = 0; i < values.length; i++) {
      if (!Number.isFinite(values[i])) {
        throw invalid(`${name} has NaN or Inf in row ${Math.floor(i / (values.length / rows))}; send finite values`);
      }
    }
  }
  const [, height, width] = grid;
  for (let n = 0; n < rows; n++) {
    const nu = params.values[n * N_PARAMS];
    const a = params.values[n * N_PARAMS + 1];
    if (nu < 0) throw invalid(`params row ${n}: the diffusivity nu = ${nu} must be >= 0`);
    const limit = maxStableDt(nu, a, height, width);
    if (model.dt > limit) {
      throw invalid(`params row ${n} (nu = ${nu}, a = ${a}): the step dt = ${model.dt} is unstable on ` +
                    `the ${height}x${width} grid (stable up to ${limit}); start the server with a smaller --dt`);
    }
  }
}

/** ModelInfer: one batch of rows through the step; answers raw if the request was raw. */
function infer(model, request) {
  findModel(model, request.model_name, request.model_version);
  const { inputs, raw_input_contents: raws } = request;
  if (inputs.length !== INPUTS.length) {
    throw invalid(`model '${model.name}' takes ${INPUTS.length} inputs [${INPUTS}], got ${inputs.length}`);
  }
  if (raws.length && raws.length !== inputs.length) {
    throw invalid(`${raws.length} raw_input_contents for ${inputs.length} inputs; send one entry per input`);
  }
  // By name when the request uses the declared names, else by position.
  const names = inputs.map((t) => t.name);
  const order = INPUTS.every((n) => names.includes(n)) ? INPUTS.map((n) => names.indexOf(n)) : [0, 1];
  const [state, params] = order.map((k, slot) =>
    decodeFp64(inputs[k], raws.length ? raws[k] : undefined, `${INPUTS[slot]} (input ${k} '${names[k]}')`));
  checkInputs(model, state, params);
  const unknown = request.outputs.map((o) => o.name).filter((n) => n !== OUTPUT);
  if (unknown.length) throw invalid(`unknown output(s) [${unknown}]; model '${model.name}' has ['${OUTPUT}']`);
  const next = step(state.values, params.values, state.shape, model.dt);
  const output = { name: OUTPUT, datatype: 'FP64', shape: state.shape };
  const response = { model_name: model.name, model_version: MODEL_VERSION, id: request.id, outputs: [output] };
  if (raws.length) response.raw_output_contents = [encodeFp64(next)];
  else output.contents = { fp64_contents: Array.from(next) };
  return response;
}

// -- gRPC ---------------------------------------------------------------------------------------

/** The KServe v2 methods, each `(request, call) -> response`, throwing RequestError to refuse. */
function makeHandlers(model, lifecycle) {
  return {
    ServerLive: () => ({ live: true }),
    ServerReady: () => ({ ready: !lifecycle.stopping }),
    ModelReady: (request) => ({
      ready: !lifecycle.stopping && request.name === model.name && ['', MODEL_VERSION].includes(request.version),
    }),
    ServerMetadata: () => ({ name: 'deepzero-oracle-node-solver', version, extensions: [] }),
    ModelMetadata: (request) => findModel(model, request.name, request.version).metadata,
    ModelInfer: (request, call) => {
      if (Number(call.getDeadline()) <= Date.now()) {
        throw new RequestError(Status.DEADLINE_EXCEEDED, 'the deadline passed before the step could run');
      }
      return infer(model, request);
    },
  };
}

/** Throws UNAUTHENTICATED unless the call carries `authorization: Bearer <token>` (if a token is set). */
function checkToken(call, token) {
  if (!token) return;
  const [sent] = call.metadata.get('authorization');
  const got = Buffer.from(String(sent ?? ''));
  const expected = Buffer.from(`Bearer ${token}`);
  if (got.length !== expected.length || !crypto.timingSafeEqual(got, expected)) {
    throw new RequestError(Status.UNAUTHENTICATED,
      sent === undefined ? "missing token: send metadata 'authorization: Bearer <token>'" : 'wrong token');
  }
}

/**
 * One service's method definitions under `serviceName`, and their implementations. Requests arrive
 * as bytes and are parsed here, so a malformed message gets INVALID_ARGUMENT (grpc-js would
 * answer INTERNAL).
 */
function bindService(definition, serviceName, handlers, token) {
  const methods = {};
  const implementation = {};
  for (const [method, d] of Object.entries(definition)) {
    if (!handlers[method]) continue;  // optional methods (ModelStatistics): gRPC answers UNIMPLEMENTED
    methods[method] = { ...d, path: `/${serviceName}/${method}`, requestDeserialize: (bytes) => bytes };
    implementation[method] = (call, callback) => {
      try {
        checkToken(call, token);
        let request;
        try {
          request = d.requestDeserialize(call.request);
        } catch (e) {
          throw invalid(`request is not a valid ${d.requestType.type.name}: ${e.message}`);
        }
        callback(null, handlers[method](request, call));
      } catch (e) {
        if (e instanceof RequestError) {
          callback({ code: e.code, details: e.message });
        } else {
          console.error(`node-solver: unexpected error in ${method}:`, e);
          callback({ code: Status.INTERNAL, details: `server error in ${method}: ${e.message}` });
        }
      }
    };
  }
  return [methods, implementation];
}

function main() {
  const options = parseOptions(process.argv.slice(2));
  const packageDefinition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const definition = packageDefinition['deepzero_oracle.v1.GRPCInferenceService'];
  const model = makeModel(options);
  const server = new grpc.Server({
    'grpc.max_receive_message_length': options.maxMessageBytes,
    'grpc.max_send_message_length': options.maxMessageBytes,
  });
  const lifecycle = { stopping: false };
  const handlers = makeHandlers(model, lifecycle);
  for (const name of SERVICE_NAMES) server.addService(...bindService(definition, name, handlers, options.token));

  const host = options.host.includes(':') ? `[${options.host}]` : options.host;
  server.bindAsync(`${host}:${options.port}`, grpc.ServerCredentials.createInsecure(), (error, port) => {
    if (error) {
      console.error(`node-solver: error: could not bind ${host}:${options.port} (${error.message}); ` +
                    'is the port in use? --port 0 picks a free one');
      process.exit(1);
    }
    // One line for people and scripts (the same shape as `deepzero-oracle serve` prints).
    console.log(`node-solver: serving '${model.name}' at ${host}:${port} ` +
                `(insecure, token ${options.token ? 'on' : 'off'})`);
  });

  const stop = () => {
    if (lifecycle.stopping) return;
    lifecycle.stopping = true; // ServerReady and ModelReady answer false from now on
    const force = setTimeout(() => server.forceShutdown(), options.grace * 1000);
    server.tryShutdown(() => {
      clearTimeout(force);
      console.log('node-solver: stopped');
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
