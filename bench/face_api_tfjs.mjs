// face-api's own Node build (TF.js, CPU) on crops written by bench/face_api.py --check-tfjs, to check the torch port.
//   node bench/face_api_tfjs.mjs <folder with the model, dist/face-api.node-wasm.js and node_modules> <folder with crops.bin>
// crops.bin: N x 112 x 112 x 3 RGB uint8. Writes <crops folder>/proba.json: face-api's probabilities, its label order.
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const [models, work] = process.argv.slice(2);
const require = createRequire(path.join(models, 'package.json'));  // resolve TF.js from the models folder's node_modules
const faceapi = require(path.join(models, 'face-api.node-wasm.js'));
const tf = faceapi.tf;
await tf.setBackend('cpu');
await tf.ready();
const manifest = JSON.parse(fs.readFileSync(path.join(models, 'face_expression_model-weights_manifest.json')));
const shards = Buffer.concat(manifest.flatMap((g) => g.paths.map((p) => fs.readFileSync(path.join(models, p)))));
const net = new faceapi.FaceExpressionNet();
net.loadFromWeightMap(tf.io.decodeWeights(shards.buffer.slice(shards.byteOffset, shards.byteOffset + shards.length),
  manifest.flatMap((g) => g.weights)));
const raw = fs.readFileSync(path.join(work, 'crops.bin'));
const size = 112 * 112 * 3;
const proba = [];
for (let i = 0; i < raw.length / size; i++) {
  const crop = tf.tensor3d(Int32Array.from(raw.subarray(i * size, (i + 1) * size)), [112, 112, 3], 'int32');
  proba.push(Array.from((await net.forward(crop)).dataSync()));
}
fs.writeFileSync(path.join(work, 'proba.json'), JSON.stringify({
  labels: ['neutral', 'happy', 'sad', 'angry', 'fearful', 'disgusted', 'surprised'], version: tf.version_core, proba }));
