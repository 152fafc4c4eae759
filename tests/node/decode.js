// Decodes serialised yolostream.v1.Tensor messages in JavaScript, from feature_service.proto alone, with the
// formulas the proto's comments give: COMPRESSION_SHUFFLE_ZSTD (zstd, then un-shuffle) and DTYPE_UINT8_AFFINE
// (value = float32(offset[c] + scale[c] * q), c along the axis the tensor's rank names). No Python code is used.
//
//   node decode.js PROTO_ROOT OUT_DIR TENSOR.bin...
//
// For each TENSOR.bin it writes OUT_DIR/<basename>.f32: the decoded values as little-endian float32, C order.
// tests/test_node_decode.py compares those bytes with Python's decode_tensor, bit for bit.
"use strict";

const fs = require("fs");
const path = require("path");
const protobuf = require("protobufjs");
const fzstd = require("fzstd");

const [protoRoot, outDir, ...inputs] = process.argv.slice(2);
if (!protoRoot || !outDir || inputs.length === 0) {
  console.error("usage: node decode.js PROTO_ROOT OUT_DIR TENSOR.bin...");
  process.exit(2);
}

const root = protobuf.loadSync(path.join(protoRoot, "yolostream", "v1", "feature_service.proto"));
const Tensor = root.lookupType("yolostream.v1.Tensor");
const Dtype = root.lookupEnum("yolostream.v1.Dtype").values;
const Compression = root.lookupEnum("yolostream.v1.Compression").values;

// Bytes per element, the unit of the byte shuffle.
function elementSize(dtype) {
  switch (dtype) {
    case Dtype.DTYPE_FLOAT32: return 4;
    case Dtype.DTYPE_FLOAT16: case Dtype.DTYPE_BFLOAT16: return 2;
    case Dtype.DTYPE_UINT8_AFFINE: return 1;
    default: throw new Error(`unsupported dtype ${dtype}`);
  }
}

// Plain bytes of data: zstd-decompress and un-shuffle when the tensor says so (plain byte i*k + j is shuffled
// byte j*n + i).
function plainBytes(msg, count) {
  const k = elementSize(msg.dtype);
  const expected = count * k;
  if (msg.compression === Compression.COMPRESSION_UNSPECIFIED || msg.compression === Compression.COMPRESSION_NONE) {
    if (msg.data.length !== expected) throw new Error(`data has ${msg.data.length} bytes, expected ${expected}`);
    return msg.data;
  }
  if (msg.compression !== Compression.COMPRESSION_SHUFFLE_ZSTD) throw new Error(`unknown compression ${msg.compression}`);
  if (msg.uncompressedSize !== expected) throw new Error(`uncompressed_size ${msg.uncompressedSize}, expected ${expected}`);
  const shuffled = fzstd.decompress(msg.data);
  if (shuffled.length !== expected) throw new Error(`zstd gave ${shuffled.length} bytes, expected ${expected}`);
  const plain = new Uint8Array(expected);
  for (let j = 0; j < k; j++) {
    for (let i = 0; i < count; i++) plain[i * k + j] = shuffled[j * count + i];
  }
  return plain;
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function decode(msg) {
  const shape = msg.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const bytes = plainBytes(msg, count);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(count);
  if (msg.dtype === Dtype.DTYPE_UINT8_AFFINE) {
    // Channel axis by rank: 3 or more -> axis 0; 2 -> axis 1 (columns); 1 or 0 -> one channel.
    const rank = shape.length;
    const channels = rank >= 3 ? shape[0] : rank === 2 ? shape[1] : 1;
    if (msg.affineScales.length !== channels || msg.affineOffsets.length !== channels) {
      throw new Error(`${channels} channels, ${msg.affineScales.length} scales, ${msg.affineOffsets.length} offsets`);
    }
    const inner = rank >= 3 ? count / shape[0] : 0;
    for (let i = 0; i < count; i++) {
      const c = rank >= 3 ? Math.floor(i / inner) : rank === 2 ? i % shape[1] : 0;
      // JavaScript numbers are doubles: scale * q is exact, the sum rounds once, Math.fround rounds to float32.
      out[i] = Math.fround(msg.affineOffsets[c] + msg.affineScales[c] * bytes[i]);
    }
  } else if (msg.dtype === Dtype.DTYPE_FLOAT32) {
    for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
  } else if (msg.dtype === Dtype.DTYPE_FLOAT16) {
    for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
  } else {
    // bfloat16: the upper 16 bits of a float32.
    const bits = new Uint32Array(1);
    const asFloat = new Float32Array(bits.buffer);
    for (let i = 0; i < count; i++) {
      bits[0] = view.getUint16(2 * i, true) << 16;
      out[i] = asFloat[0];
    }
  }
  return out;
}

for (const input of inputs) {
  const msg = Tensor.toObject(Tensor.decode(fs.readFileSync(input)), { longs: Number, enums: Number, defaults: true });
  const values = decode(msg);
  const target = path.join(outDir, path.basename(input, path.extname(input)) + ".f32");
  fs.writeFileSync(target, Buffer.from(values.buffer, values.byteOffset, values.byteLength));
  console.log(`${path.basename(input)}: dtype ${msg.dtype}, shape [${msg.shape.join(", ")}], compression ` +
              `${msg.compression}, ${values.length} values -> ${target}`);
}
