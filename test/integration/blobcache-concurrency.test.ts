// Eight processes copy overlapping images through one cache directory at once (both sides
// wrapped, compress mode, half of them making gzip variants and half zstd). Afterwards the
// directory holds only whole, verified entries, no temporary files or locks, and notes that
// name every variant any process made. The children run the built package (dist/), which
// `npm test` builds before vitest runs.
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { parseCompressedNote } from '../../src/blobcache/index.js'
import { compressStream, decompressStream, detectCompression } from '../../src/compression.js'
import { type Digest, digestHex, digestOf, isDigest } from '../../src/digest.js'
import { layerCompressionOf, parseManifest } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { DirReference } from '../../src/transports/dir.js'
import { readAll, testDir } from '../helpers/conformance.js'
import { makeLayer } from '../helpers/make-layer.js'
import { randomBytesFrom } from '../helpers/random-image.js'

// BLOBCACHE_DIST points the children at another build of the package (default: dist/).
const DIST = process.env.BLOBCACHE_DIST ?? resolve(__dirname, '../../dist/index.js')
const PROCESSES = 8

const CHILD = `
import { BlobCache, copyImage, parseImageName } from ${JSON.stringify(DIST)}
const [cacheDir, algorithm, startAt, ...jobs] = process.argv.slice(2)
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 5))
const opts = { compressAlgorithm: algorithm }
const totals = { hits: 0, misses: 0, errors: 0 }
for (const job of jobs) {
  const [src, dest] = job.split('=>')
  const from = new BlobCache(parseImageName(src), cacheDir, 'compress', opts)
  const to = new BlobCache(parseImageName(dest), cacheDir, 'compress', opts)
  await copyImage(from, to)
  for (const c of [from, to]) for (const k of Object.keys(totals)) totals[k] += c.stats[k]
}
process.stdout.write(JSON.stringify(totals))
`

/** Each child stores VARIANTS multi-member gzip variants of one tar, all different, at once. */
const VARIANTS = 5
const NOTES_CHILD = `
import { readFile } from 'node:fs/promises'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { BlobCache, digestOf, dir } from ${JSON.stringify(DIST)}
const [cacheDir, tarFile, outDir, index, startAt] = process.argv.slice(2)
const tar = await readFile(tarFile)
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 2))
const cache = new BlobCache(dir.parseReference(outDir), cacheDir)
const dest = await cache.newImageDestination()
for (let j = 0; j < ${VARIANTS}; j++) {
  const split = 512 * (Number(index) * ${VARIANTS} + j + 1)
  const blob = Buffer.concat([gzipSync(tar.subarray(0, split)), gzipSync(tar.subarray(split))])
  await dest.putBlob(Readable.from([blob]), { digest: digestOf(blob), size: blob.length })
}
await dest.close()
process.stdout.write(JSON.stringify(cache.stats))
`

type Kind = 'tar' | 'gzip' | 'zstd'

async function layerBlob(tar: Buffer, kind: Kind): Promise<Buffer> {
  if (kind === 'gzip') return gzipSync(tar)
  if (kind === 'zstd') return readAll(Readable.from([tar]).pipe(compressStream('zstd')))
  return tar
}

/** Writes a dir: image with the given layers (content seed + compression); resolves seed -> diffID. */
async function writeImage(path: string, layers: [string, Kind][]): Promise<Map<string, Digest>> {
  const blobs: { bytes: Buffer; mediaType: string; diffID: Digest }[] = []
  for (const [seed, kind] of layers) {
    const tar = makeLayer([{ name: `file-${seed}`, content: randomBytesFrom(1, seed, 300_000) }])
    const bytes = await layerBlob(tar, kind)
    const mediaType = kind === 'tar' ? MediaType.ociLayer : kind === 'gzip' ? MediaType.ociLayerGzip : MediaType.ociLayerZstd
    blobs.push({ bytes, mediaType, diffID: digestOf(tar) })
  }
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: blobs.map((b) => b.diffID) } }))
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: blobs.map((b) => ({ mediaType: b.mediaType, digest: digestOf(b.bytes), size: b.bytes.length })),
  }))
  const dest = await new DirReference(path).newImageDestination()
  for (const b of blobs) await dest.putBlob(Readable.from([b.bytes]), { digest: digestOf(b.bytes), size: b.bytes.length })
  await dest.putBlob(Readable.from([config]), { digest: digestOf(config), size: config.length }, { isConfig: true })
  await dest.putManifest(manifest)
  await dest.commit()
  await dest.close()
  return new Map(layers.map(([seed], i) => [seed, blobs[i].diffID]))
}

function run(script: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => resolvePromise({ code, stdout, stderr }))
  })
}

async function decompressedDigest(bytes: Buffer): Promise<Digest> {
  const alg = detectCompression(bytes.subarray(0, 8))
  return digestOf(alg ? await readAll(Readable.from([bytes]).pipe(decompressStream(alg))) : bytes)
}

describe.skipIf(!existsSync(DIST))('blob cache shared by concurrent processes', () => {
  it(`${PROCESSES} processes copying overlapping images leave only valid entries and complete notes`, async () => {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    // Four images sharing an uncompressed base, a gzip base (whose zstd twin is in image 3),
    // and each with a layer of its own.
    const images: [string, Kind][][] = [
      [['base', 'tar'], ['shared', 'gzip'], ['own-0', 'gzip']],
      [['base', 'tar'], ['shared', 'gzip'], ['own-1', 'tar']],
      [['base', 'tar'], ['own-2', 'zstd'], ['shared', 'gzip']],
      [['shared', 'zstd'], ['base', 'tar'], ['own-3', 'tar']],
    ]
    const diffIDs = new Map<string, Digest>()
    for (const [i, layers] of images.entries()) {
      for (const [seed, d] of await writeImage(join(root, `src-${i}`), layers)) diffIDs.set(seed, d)
    }
    // The algorithms each layer's note must list: every uncompressed layer gets a variant from
    // the gzip processes and one from the zstd processes; compressed layers list what came in.
    const expected = new Map<Digest, string[]>([
      [diffIDs.get('base')!, ['gzip', 'zstd']],
      [diffIDs.get('shared')!, ['gzip', 'zstd']],
      [diffIDs.get('own-0')!, ['gzip']],
      [diffIDs.get('own-1')!, ['gzip', 'zstd']],
      [diffIDs.get('own-2')!, ['zstd']],
      [diffIDs.get('own-3')!, ['gzip', 'zstd']],
    ])
    const script = join(root, 'child.mjs')
    await writeFile(script, CHILD)
    const startAt = String(Date.now() + 1500)
    const children = Array.from({ length: PROCESSES }, (_, p) => {
      const jobs = [0, 1].map((k) => `dir:${join(root, `src-${(p + k) % 4}`)}=>dir:${join(root, `out-${p}-${k}`)}`)
      return run(script, [cacheDir, p % 2 ? 'zstd' : 'gzip', startAt, ...jobs])
    })
    const results = await Promise.all(children)
    for (const r of results) {
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expect(JSON.parse(r.stdout).errors).toBe(0)
    }

    // every output image is whole, with media types that match the bytes
    for (let p = 0; p < PROCESSES; p++) {
      for (const k of [0, 1]) {
        const out = join(root, `out-${p}-${k}`)
        const parsed = parseManifest(await readFile(join(out, 'manifest.json')))
        if (parsed.kind !== 'image') throw new Error('not an image')
        for (const l of parsed.manifest.layers) {
          const bytes = await readFile(join(out, digestHex(l.digest)))
          expect(digestOf(bytes)).toBe(l.digest)
          expect(detectCompression(bytes.subarray(0, 8))).toBe(layerCompressionOf(l.mediaType))
        }
      }
    }

    // the cache: no leftovers, every entry verified, every note complete and pointing at real entries
    const names = await readdir(cacheDir)
    expect(names.filter((n) => n.startsWith('.tmp-') || !n.startsWith('sha256:'))).toEqual([])
    for (const n of names) {
      const d = n.replace(/\.config$/, '')
      if (isDigest(d)) expect(digestOf(await readFile(join(cacheDir, n)))).toBe(d)
    }
    const uncompressedLayers = new Set<Digest>()
    for (const n of names.filter((x) => x.endsWith('.decompressed'))) {
      const c = n.slice(0, -'.decompressed'.length) as Digest
      const u = (await readFile(join(cacheDir, n), 'utf8')) as Digest
      expect(names).toContain(u)
      expect(await decompressedDigest(await readFile(join(cacheDir, c)))).toBe(u)
      const note = parseCompressedNote(await readFile(join(cacheDir, `${u}.compressed`), 'utf8'))
      expect(note.has(c)).toBe(true)
      uncompressedLayers.add(u)
    }
    for (const u of uncompressedLayers) {
      const note = parseCompressedNote(await readFile(join(cacheDir, `${u}.compressed`), 'utf8'))
      for (const [c, alg] of note) {
        expect(names).toContain(c)
        expect(detectCompression((await readFile(join(cacheDir, c))).subarray(0, 8))).toBe(alg)
        expect(await readFile(join(cacheDir, `${c}.decompressed`), 'utf8')).toBe(u)
      }
      expect([...note.values()].sort()).toEqual(expected.get(u))
    }
    expect([...uncompressedLayers].sort()).toEqual([...expected.keys()].sort())
  })

  it(`${PROCESSES} processes adding variants of one layer at once lose no note entry`, async () => {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const tar = makeLayer([{ name: 'text', content: 'all work and no play '.repeat(20_000) }])
    const diffID = digestOf(tar)
    await writeFile(join(root, 'layer.tar'), tar)
    const script = join(root, 'notes-child.mjs')
    await writeFile(script, NOTES_CHILD)
    const startAt = String(Date.now() + 1500)
    const results = await Promise.all(
      Array.from({ length: PROCESSES }, (_, p) => run(script, [cacheDir, join(root, 'layer.tar'), join(root, `out-${p}`), String(p), startAt])),
    )
    for (const r of results) {
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expect(JSON.parse(r.stdout).errors).toBe(0)
    }
    const note = parseCompressedNote(await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8'))
    expect(note.size).toBe(PROCESSES * VARIANTS)
    const names = await readdir(cacheDir)
    for (const [c, alg] of note) {
      expect(alg).toBe('gzip')
      expect(names).toContain(c)
      expect(await readFile(join(cacheDir, `${c}.decompressed`), 'utf8')).toBe(diffID)
    }
    expect(names.filter((n) => n.startsWith('.tmp-'))).toEqual([])
    expect(names).toHaveLength(1 + 1 + 2 * PROCESSES * VARIANTS) // U, U.compressed, each C and C.decompressed
  })
})
