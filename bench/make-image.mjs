// Generates the benchmark images as OCI layouts, with no help from the library under test: a
// small ustar writer, node:zlib gzip and sha256, written with temp + rename. Each image is made
// once and kept in a cache directory keyed by its parameters.
import { createHash, randomBytes } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { copyFile, mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createGzip } from 'node:zlib'

const MiB = 1 << 20

/**
 * Makes (or finds) an OCI layout at `dir` with `layers` gzip layers, each a tar of files
 * holding `layerBytes` of content; `randomShare` of it random bytes and the rest text, so the
 * layers compress partially. Tagged `latest`. Resolves the manifest digest and total blob bytes.
 */
export async function ensureOciImage(dir, { layers, layerBytes, randomShare = 0.5, level = 6, filesPerLayer = 8 }) {
  const done = join(dir, '.complete.json')
  try {
    return JSON.parse(await readFile(done, 'utf8'))
  } catch {
    // not made yet
  }
  await rm(dir, { recursive: true, force: true })
  const blobs = join(dir, 'blobs', 'sha256')
  await mkdir(blobs, { recursive: true })

  const made = await Promise.all(
    Array.from({ length: layers }, (_, i) =>
      writeLayer(blobs, { index: i, layerBytes, randomShare, level, filesPerLayer }),
    ),
  )
  const config = Buffer.from(
    JSON.stringify({
      created: '2024-01-01T00:00:00Z',
      architecture: 'amd64',
      os: 'linux',
      config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'] },
      rootfs: { type: 'layers', diff_ids: made.map((l) => l.diffId) },
      history: made.map((_, i) => ({ created: '2024-01-01T00:00:00Z', created_by: `bench layer ${i}` })),
    }),
  )
  const configDigest = await writeBlob(blobs, config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: made.map((l) => ({
        mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
        digest: l.digest,
        size: l.size,
      })),
    }),
  )
  const manifestDigest = await writeBlob(blobs, manifest)
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
  await writeFile(
    join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          digest: manifestDigest,
          size: manifest.length,
          annotations: { 'org.opencontainers.image.ref.name': 'latest' },
        },
      ],
    }),
  )
  const meta = {
    manifestDigest,
    layers: made.map((l) => ({ digest: l.digest, size: l.size, diffId: l.diffId, uncompressed: l.uncompressed })),
    blobBytes: made.reduce((n, l) => n + l.size, 0) + config.length + manifest.length,
  }
  await writeFile(done, JSON.stringify(meta, null, 2))
  return meta
}

/** Writes `dir:` transport files (version, manifest.json, one file per blob by hex) from a layout. */
export async function ensureDirImage(dir, layoutDir, meta) {
  const done = join(dir, '.complete')
  if (await exists(done)) return
  await rm(dir, { recursive: true, force: true })
  await mkdir(dir, { recursive: true })
  const blobPath = (d) => join(layoutDir, 'blobs', 'sha256', d.slice('sha256:'.length))
  const manifest = await readFile(blobPath(meta.manifestDigest))
  const parsed = JSON.parse(manifest.toString('utf8'))
  for (const desc of [parsed.config, ...parsed.layers]) {
    await copyFile(blobPath(desc.digest), join(dir, desc.digest.slice('sha256:'.length)))
  }
  await writeFile(join(dir, 'manifest.json'), manifest)
  await writeFile(join(dir, 'version'), 'Directory Transport Version: 1.1\n')
  await writeFile(done, '')
}

async function writeLayer(blobs, { index, layerBytes, randomShare, level, filesPerLayer }) {
  const fileBytes = Math.floor(layerBytes / filesPerLayer)
  const randomFiles = Math.round(filesPerLayer * randomShare)
  const entries = Array.from({ length: filesPerLayer }, (_, f) => ({
    path: `layer${index}/${f < randomFiles ? 'random' : 'text'}-${f}.bin`,
    size: fileBytes,
    kind: f < randomFiles ? 'random' : 'text',
  }))
  const diff = hashing()
  const compressed = hashing()
  const tmp = join(blobs, `.tmp-layer-${index}-${process.pid}`)
  await pipeline(
    Readable.from(tarStream(entries, index)),
    diff.stream,
    createGzip({ level, chunkSize: MiB }),
    compressed.stream,
    createWriteStream(tmp, { highWaterMark: MiB }),
  )
  const digest = `sha256:${compressed.hex()}`
  await rename(tmp, join(blobs, compressed.hex()))
  return { digest, size: compressed.bytes(), diffId: `sha256:${diff.hex()}`, uncompressed: diff.bytes() }
}

async function* tarStream(entries, seed) {
  const rng = xorshift(seed + 1)
  yield header(`layer${seed}/`, 0, '5', 0o755)
  for (const entry of entries) {
    yield header(entry.path, entry.size, '0', 0o644)
    let left = entry.size
    while (left > 0) {
      const n = Math.min(left, MiB)
      yield entry.kind === 'random' ? randomBytes(n) : text(n, rng)
      left -= n
    }
    const pad = (512 - (entry.size % 512)) % 512
    if (pad) yield Buffer.alloc(pad)
  }
  yield Buffer.alloc(1024)
}

function header(path, size, type, mode) {
  const h = Buffer.alloc(512)
  h.write(path, 0, 100, 'utf8')
  h.write(mode.toString(8).padStart(7, '0') + '\0', 100, 'ascii')
  h.write('0000000\0', 108, 'ascii')
  h.write('0000000\0', 116, 'ascii')
  h.write(size.toString(8).padStart(11, '0') + '\0', 124, 'ascii')
  h.write((1704067200).toString(8).padStart(11, '0') + '\0', 136, 'ascii')
  h.write('        ', 148, 'ascii')
  h.write(type, 156, 'ascii')
  h.write('ustar\0' + '00', 257, 'ascii')
  let sum = 0
  for (const b of h) sum += b
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'ascii')
  return h
}

const WORDS = (
  'image layer blob digest manifest config registry cache tag index platform compress gzip zstd ' +
  'copy source destination verify stream archive transport reference annotation media type size ' +
  'the of and to in is that for it as with was on be by this are from at or an have not which'
).split(' ')

function text(n, rng) {
  const parts = []
  let len = 0
  while (len < n) {
    const line = []
    const words = 6 + (rng() % 10)
    for (let i = 0; i < words; i++) line.push(WORDS[rng() % WORDS.length] + (rng() % 7 === 0 ? rng() % 1000 : ''))
    const s = line.join(' ') + '\n'
    parts.push(s)
    len += s.length
  }
  return Buffer.from(parts.join('')).subarray(0, n)
}

function xorshift(seed) {
  let x = (seed * 2654435761) >>> 0 || 1
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x
  }
}

function hashing() {
  const hash = createHash('sha256')
  let bytes = 0
  let hex
  const stream = new Transform({
    highWaterMark: MiB,
    transform(chunk, _enc, cb) {
      hash.update(chunk)
      bytes += chunk.length
      cb(null, chunk)
    },
    flush(cb) {
      hex = hash.digest('hex')
      cb()
    },
  })
  return { stream, hex: () => hex, bytes: () => bytes }
}

async function writeBlob(blobs, data) {
  const hex = createHash('sha256').update(data).digest('hex')
  await writeFile(join(blobs, hex), data)
  return `sha256:${hex}`
}

async function exists(file) {
  return stat(file).then(
    () => true,
    () => false,
  )
}
