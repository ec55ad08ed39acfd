// Hostile input beyond tar archives, generated with fast-check:
// - a blob-cache directory tampered with after the fact (bytes flipped, truncated or swapped,
//   entries replaced by symbolic links out of the directory or by directories, notes holding
//   garbage, traversal or foreign digests, stray files): copies through it give the right image
//   or a typed error, each corrupt entry costs at most one failed copy (it is dropped when
//   found), nothing outside is written, and verify() leaves only entries that hash right;
// - manifests and configs mutated field by field (stored under their true digests, so that only
//   their meaning is hostile), copied with every compression and format option through a
//   BlobCache: a typed error or a destination holding a whole, consistent image.
import { createHash } from 'node:crypto'
import { copyFile, lstat, mkdir, mkdtemp, readFile, readdir, rename, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { copyImage } from '../../src/copy.js'
import { digestOf } from '../../src/digest.js'
import { type ErrorCode, isImageError } from '../../src/errors.js'
import { MediaType } from '../../src/media-types.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import type { LayerCompression } from '../../src/types.js'
import { knob, recordFigures, runSeed } from '../helpers/children.js'
import { putBlob } from '../helpers/image-cache-fixtures.js'
import { checkBlobCacheDir, checkLayoutDir, entryNames, imageContent, treeOf } from '../helpers/invariants.js'
import type { RandomImage } from '../helpers/random-image.js'
import { buildImage, mutate, writeImageTo } from '../helpers/reliability-fixtures.js'

const RUNS = knob('input_runs', 60)
const seed = runSeed()
const figures: Record<string, number> = {}
const codes: Record<string, number> = {}
const bump = (k: string, by = 1) => (figures[k] = (figures[k] ?? 0) + by)

async function typed<T>(allowed: ErrorCode[] | 'any', p: Promise<T>): Promise<T | undefined> {
  try {
    return await p
  } catch (err) {
    if (!isImageError(err) || (allowed !== 'any' && !allowed.includes(err.code))) throw new Error(`expected a typed ImageError, got ${(err as Error)?.stack ?? String(err)}`)
    codes[err.code] = (codes[err.code] ?? 0) + 1
    return undefined
  }
}

async function snapshot(dir: string): Promise<string> {
  const h = createHash('sha256')
  for (const p of await treeOf(dir)) h.update(p + '\0').update(await readFile(join(dir, p)).catch(() => Buffer.from('<dir>')))
  return h.digest('hex')
}

let root: string
let sentinel: string
let sentinelBefore: string
let image: RandomImage
let src: string

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'blobcache-rel-input-'))
  sentinel = join(root, 'sentinel')
  await mkdir(sentinel)
  await writeFile(join(sentinel, 'target'), 'must never change')
  sentinelBefore = await snapshot(sentinel)
  image = await buildImage([
    { seed: 'in-a', size: 120_000, compression: 'gzip' },
    { seed: 'in-b', size: 80_000, compression: null },
    { seed: 'in-c', size: 60_000, compression: 'zstd' },
  ])
  src = join(root, 'src')
  await writeImageTo(new OciLayoutReference(src, 'v1'), image)
})
afterAll(async () => {
  try {
    expect(await snapshot(sentinel)).toBe(sentinelBefore)
    console.log(JSON.stringify(recordFigures('hostile-input', { seed, runsPerProperty: RUNS, ...figures, codes })))
  } finally {
    await rm(root, { recursive: true, force: true })
  }
})

// ---- a tampered blob cache -------------------------------------------------------------------

type Tamper = 'flip' | 'truncate' | 'extend' | 'swap' | 'symlink-out' | 'symlink-in' | 'directory' | 'delete' | 'note-garbage' | 'note-traversal' | 'note-foreign' | 'stray'
const tamperArb = fc.record({
  kind: fc.constantFrom<Tamper>('flip', 'truncate', 'extend', 'swap', 'symlink-out', 'symlink-in', 'directory', 'delete', 'note-garbage', 'note-traversal', 'note-foreign', 'stray'),
  pick: fc.nat(1000),
  other: fc.nat(1000),
  text: fc.string({ maxLength: 200 }),
})

async function tamper(dir: string, t: { kind: Tamper; pick: number; other: number; text: string }): Promise<void> {
  const names = (await readdir(dir)).sort()
  // only regular files are tampered with: writing through a link an earlier tamper made would
  // change the file it points to (the test's own doing, not the library's)
  const regular = async (n: string) => (await lstat(join(dir, n))).isFile()
  const blobs: string[] = []
  for (const n of names) if (/^sha256:[0-9a-f]{64}(\.config)?$/.test(n) && (await regular(n))) blobs.push(n)
  const notes = names.filter((n) => n.endsWith('.compressed') || n.endsWith('.decompressed'))
  const blob = blobs[t.pick % Math.max(1, blobs.length)]
  const other = blobs[t.other % Math.max(1, blobs.length)]
  const note = notes[t.pick % Math.max(1, notes.length)]
  const path = (n: string) => join(dir, n)
  switch (t.kind) {
    case 'flip': {
      if (!blob) return
      const b = await readFile(path(blob))
      if (b.length) b[t.other % b.length] ^= 0x01
      return writeFile(path(blob), b)
    }
    case 'truncate':
      if (blob) await writeFile(path(blob), (await readFile(path(blob))).subarray(0, t.other % 500))
      return
    case 'extend':
      if (blob) await writeFile(path(blob), Buffer.concat([await readFile(path(blob)), Buffer.from(t.text || 'x')]))
      return
    case 'swap': {
      if (!blob || !other || blob === other) return
      const [a, b] = [await readFile(path(blob)), await readFile(path(other))]
      await writeFile(path(blob), b)
      return writeFile(path(other), a)
    }
    case 'symlink-out':
      if (!blob) return
      await rm(path(blob))
      return symlink(join(sentinel, 'target'), path(blob))
    case 'symlink-in':
      if (!blob || !other || blob === other) return
      await rm(path(blob))
      return symlink(other, path(blob))
    case 'directory':
      if (!blob) return
      await rm(path(blob))
      await mkdir(path(blob))
      return writeFile(join(path(blob), 'inside'), 'x')
    case 'delete':
      if (blob) await rm(path(blob))
      return
    case 'note-garbage':
      if (note) await writeFile(path(note), t.text)
      return
    case 'note-traversal':
      if (note) await writeFile(path(note), note.endsWith('.decompressed') ? '../../sentinel/target' : `../../sentinel/target gzip\n${t.text}`)
      return
    case 'note-foreign':
      if (note && other) await writeFile(path(note), note.endsWith('.decompressed') ? other.replace('.config', '') : `${other.replace('.config', '')} zstd`)
      return
    case 'stray':
      await writeFile(path(['.tmp-stray', 'sha256:zz', `sha256:${'0'.repeat(64)}`, 'sha256:' + 'a'.repeat(64) + '.decompressed', 'README'][t.other % 5]), t.text)
  }
}

/** Gives every file in `dir` an inode of its own (a copy renamed over it), breaking hard links. */
async function unshare(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    await copyFile(join(dir, name), join(dir, `.unshare-${name}`))
    await rename(join(dir, `.unshare-${name}`), join(dir, name))
  }
}

describe('a tampered blob cache', () => {
  it('copies through it: the right image or a typed error, each corrupt entry dropped, nothing written outside', async () => {
    const wantDiffIDs = image.layers.map((l) => l.diffID)
    let n = 0
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom<LayerCompression>('preserve', 'compress', 'decompress'),
        fc.constantFrom<LayerCompression>('preserve', 'compress', 'decompress'),
        fc.array(tamperArb, { minLength: 1, maxLength: 4 }),
        async (fillMode, readMode, tampers) => {
          bump('tamperedCaches')
          const work = join(root, `cache-${n++}`)
          const cache = join(work, 'cache')
          await mkdir(cache, { recursive: true })
          // fill the cache (variants and notes included), then tamper with it
          await copyImage(new BlobCache(new OciLayoutReference(src, 'v1'), cache, fillMode), new BlobCache(new OciLayoutReference(join(work, 'first'), 'v1'), cache, fillMode))
          // The copy hard-linked its blobs to the cache entries; tampering with an entry in place
          // would damage that image as well. It stands for a source that is whole: its own files.
          await unshare(join(work, 'first', 'blobs', 'sha256'))
          for (const t of tampers) await tamper(cache, t)
          bump('tampers', tampers.length)
          // copy through it, from the cached first copy (so the cache serves) and from the source
          let attempts = 0
          for (const from of [join(work, 'first'), src]) {
            const dest = join(work, `dest-${attempts}`)
            let done
            for (let i = 0; i <= tampers.length + 1 && !done; i++) {
              attempts++
              await rm(dest, { recursive: true, force: true })
              done = await typed('any', copyImage(new BlobCache(new OciLayoutReference(from, 'v1'), cache, readMode), new BlobCache(new OciLayoutReference(dest, 'v1'), cache, readMode)))
              if (!done) bump('failedCopies')
            }
            expect(done, 'a corrupt entry MUST cost at most one failed copy').toBeDefined()
            const content = await imageContent(new OciLayoutReference(dest, 'v1'))
            expect(content.diffIDs).toEqual(wantDiffIDs)
            expect(content.configDiffIDs).toEqual(wantDiffIDs)
            expect((await checkLayoutDir(dest)).damage).toEqual([])
          }
          bump('copies', attempts)
          expect(await snapshot(sentinel)).toBe(sentinelBefore)
          // verify() leaves only entries that hash to their names
          await new BlobCache(new OciLayoutReference(src, 'v1'), cache).verify()
          const after = await checkBlobCacheDir(cache)
          expect(after.damage.filter((d) => d.why.startsWith('hashes to'))).toEqual([])
          expect((await treeOf(work)).filter((p) => p.split('/').pop()!.startsWith('.tmp-') && !p.endsWith('.tmp-stray'))).toEqual([])
          await rm(work, { recursive: true, force: true })
        },
      ),
      { numRuns: RUNS, seed, endOnFailure: true },
    )
    // a symbolic link out of the cache was never followed for writing
    expect((await lstat(join(sentinel, 'target'))).isFile()).toBe(true)
  }, 60_000 + RUNS * 1500)
})

// ---- hostile manifests and configs ---------------------------------------------------------------

const hostileValue = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(-1, 1e300, 2 ** 53, '12', null, [], {}, 'sha256:../../sentinel/target', '../../sentinel/target', `sha256:${'0'.repeat(64)}`, MediaType.ociIndex, MediaType.dockerManifest, 'application/vnd.oci.image.layer.v1.tar+bzip2'),
)

describe('hostile manifests and configs through copyImage', () => {
  it('a typed error, or a destination holding a whole and consistent image', async () => {
    let n = 0
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          target: fc.constantFrom('manifest', 'config', 'config-bytes'),
          path: fc.array(fc.nat(12), { maxLength: 4 }),
          value: hostileValue,
          bytes: fc.uint8Array({ maxLength: 200 }),
          compression: fc.constantFrom<LayerCompression | undefined>(undefined, 'preserve', 'compress', 'decompress'),
          algorithm: fc.constantFrom<'gzip' | 'zstd'>('gzip', 'zstd'),
          format: fc.constantFrom<'oci' | 'v2s2' | undefined>(undefined, 'oci', 'v2s2'),
          cacheMode: fc.constantFrom<LayerCompression>('preserve', 'compress', 'decompress'),
        }),
        async (c) => {
          bump('hostileManifests')
          const work = join(root, `manifest-${n++}`)
          const layout = join(work, 'src')
          await writeImageTo(new OciLayoutReference(layout, 'v1'), image)
          // the hostile document, stored under its true digest and named by a manifest that matches it
          let config = image.config
          let manifest: unknown = JSON.parse(image.manifest.toString())
          if (c.target === 'config') config = Buffer.from(JSON.stringify(mutate(JSON.parse(image.config.toString()), c.path, c.value)) ?? 'null')
          if (c.target === 'config-bytes') config = Buffer.from(c.bytes)
          if (c.target !== 'manifest') {
            await putBlob(layout, config)
            manifest = { ...(manifest as object), config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length } }
          } else manifest = mutate(manifest, c.path, c.value)
          const bytes = Buffer.from(JSON.stringify(manifest) ?? 'null')
          await putBlob(layout, bytes)
          await writeFile(join(layout, 'index.json'), JSON.stringify({
            schemaVersion: 2, manifests: [{ mediaType: MediaType.ociManifest, digest: digestOf(bytes), size: bytes.length, annotations: { 'org.opencontainers.image.ref.name': 'v1' } }],
          }))
          const cache = join(work, 'cache')
          await mkdir(cache)
          const dest = join(work, 'dest')
          const done = await typed('any', copyImage(
            new OciLayoutReference(layout, 'v1'),
            new BlobCache(new OciLayoutReference(dest, 'v1'), cache, c.cacheMode),
            { compression: c.compression, compressionAlgorithm: c.algorithm, manifestFormat: c.format, sourceCtx: { tmpDir: work }, destCtx: { tmpDir: work } },
          ))
          const report = await checkLayoutDir(dest)
          expect(report.damage).toEqual([])
          expect(report.leftovers).toEqual([])
          if (done) {
            bump('hostileManifestsCopied')
            expect(entryNames(report)).toEqual(['v1'])
          } else expect(entryNames(report)).toEqual([])
          const cached = await checkBlobCacheDir(cache)
          expect(cached.damage).toEqual([])
          expect(cached.leftovers).toEqual([])
          expect((await readdir(work)).sort()).toEqual(done || (await lstat(dest).catch(() => undefined)) ? ['cache', 'dest', 'src'] : ['cache', 'src'])
          expect(await snapshot(sentinel)).toBe(sentinelBefore)
          await rm(work, { recursive: true, force: true })
        },
      ),
      { numRuns: RUNS, seed, endOnFailure: true },
    )
  }, 60_000 + RUNS * 800)
})
