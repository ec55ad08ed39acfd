// Hostile tar archives, generated with fast-check (path traversal, absolute names, symlink and
// hardlink escapes and loops, sizes that lie or are huge, duplicate entries, deep nesting, pax
// and GNU long names, bad checksums, truncation), through openTarIndex, the oci-archive
// transport (copyImage) and ImageCache.imageLoad. Each is a typed ImageError or a correct
// result; nothing is written outside the target (a sentinel directory is compared before and
// after); no temporary file survives; memory stays bounded on huge declared sizes.
import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, open, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { digestOf } from '../../src/digest.js'
import { type ErrorCode, isImageError } from '../../src/errors.js'
import { ImageCache } from '../../src/image-cache/index.js'
import { MediaType } from '../../src/media-types.js'
import { openTarIndex } from '../../src/tar.js'
import { parseImageName } from '../../src/transports/index.js'
import { knob, recordFigures, runSeed } from '../helpers/children.js'
import { readAll } from '../helpers/conformance.js'
import { type RawEntry, entryBlocks, escapes, hostileLinks, ociArchiveEntries, rawEntryArb, rawTar, sometimes } from '../helpers/hostile-tar.js'
import { checkLayoutDir, imageContent, treeOf } from '../helpers/invariants.js'
import type { RandomImage } from '../helpers/random-image.js'
import { buildImage } from '../helpers/reliability-fixtures.js'

const RUNS = knob('tar_runs', 150)
const seed = runSeed()
const figures: Record<string, number | Record<string, number>> = { seed, runsPerProperty: RUNS }
const codes: Record<string, number> = {}
const bump = (k: string, by = 1) => (figures[k] = ((figures[k] as number) ?? 0) + by)

/** Awaits `p`; a rejection MUST be an ImageError with one of `allowed`. Resolves the value or undefined. */
async function typed<T>(allowed: ErrorCode[], p: Promise<T>): Promise<T | undefined> {
  try {
    return await p
  } catch (err) {
    if (!isImageError(err) || !allowed.includes(err.code)) throw new Error(`expected an ImageError ${allowed.join('|')}, got ${(err as Error)?.stack ?? String(err)}`)
    codes[err.code] = (codes[err.code] ?? 0) + 1
    return undefined
  }
}

/** A hash of every path and file content under `dir`, to compare before and after. */
async function snapshot(dir: string): Promise<string> {
  const h = createHash('sha256')
  for (const p of await treeOf(dir)) {
    h.update(p + '\0')
    const bytes = await readFile(join(dir, p)).catch(() => Buffer.from('<dir>'))
    h.update(bytes)
  }
  return h.digest('hex')
}

/** Peak resident memory growth (bytes) while `fn` runs, sampled every 10 ms. */
async function peakGrowth<T>(fn: () => Promise<T>): Promise<{ value: T | undefined; error?: unknown; growth: number }> {
  globalThis.gc?.()
  const before = process.memoryUsage().rss
  let peak = before
  const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 10)
  try {
    const value = await fn()
    return { value, growth: Math.max(peak, process.memoryUsage().rss) - before }
  } catch (error) {
    return { value: undefined, error, growth: Math.max(peak, process.memoryUsage().rss) - before }
  } finally {
    clearInterval(timer)
  }
}

let root: string
let sentinel: string
let sentinelBefore: string
let image: RandomImage
let index: object

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'blobcache-rel-tar-'))
  sentinel = join(root, 'sentinel')
  await mkdir(sentinel)
  await writeFile(join(sentinel, 'target'), 'must never change')
  await writeFile(join(sentinel, 'pwned'), 'must never change either')
  sentinelBefore = await snapshot(sentinel)
  image = await buildImage([{ seed: 'tar-a', size: 20_000, compression: 'gzip' }, { seed: 'tar-b', size: 9_000, compression: null }])
  index = {
    schemaVersion: 2, mediaType: MediaType.ociIndex,
    manifests: [{
      mediaType: image.mediaType, digest: image.manifestDigest, size: image.manifest.length,
      annotations: { 'org.opencontainers.image.ref.name': 'latest', 'io.containerd.image.name': 'docker.io/rel/hostile:1' },
    }],
  }
})
afterAll(async () => {
  try {
    expect(await snapshot(sentinel)).toBe(sentinelBefore)
    console.log(JSON.stringify(recordFigures('hostile-tar', { ...figures, codes })))
  } finally {
    await rm(root, { recursive: true, force: true })
  }
})

/** The valid archive of the test image, with `extra` entries spliced in at the given positions. */
function hostileArchive(extra: { at: number; entry: RawEntry }[], replace?: { blob: number; entry: RawEntry }): RawEntry[] {
  const blobs = new Map<string, Buffer>([...image.blobs, [image.manifestDigest, image.manifest]])
  const entries = ociArchiveEntries(blobs, index)
  if (replace) {
    const i = 4 + (replace.blob % blobs.size)
    entries[i] = { ...replace.entry, path: entries[i].path }
  }
  for (const { at, entry } of extra) entries.splice(at % (entries.length + 1), 0, entry)
  return entries
}

/** Entries replacing a blob: links to other blobs (legal), links out (illegal), wrong bytes. */
const replacementArb = fc.record({
  blob: fc.nat(10),
  entry: fc.oneof(
    fc.record({ path: fc.constant(''), type: fc.constantFrom<'1' | '2'>('1', '2'), linkname: fc.oneof(hostileLinks, fc.constantFrom('../../sentinel/target', '/proc/self/environ', 'blobs/sha256')) }),
    fc.record({ path: fc.constant(''), data: fc.uint8Array({ maxLength: 3000 }).map((b) => Buffer.from(b)) }),
  ) as fc.Arbitrary<RawEntry>,
})
const archiveArb = fc.record({
  extra: fc.array(fc.record({ at: fc.nat(20), entry: rawEntryArb }), { maxLength: 5 }),
  replace: sometimes(replacementArb, 3),
  /** Cut the archive at this fraction of its length (1: whole), and whether to end it properly. */
  cut: fc.oneof({ weight: 4, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.double({ min: 0, max: 1, noNaN: true }) }),
  end: fc.boolean(),
  chunk: fc.integer({ min: 1, max: 70_000 }),
})

function archiveBytes(a: { extra: { at: number; entry: RawEntry }[]; replace?: { blob: number; entry: RawEntry }; cut: number; end: boolean }): Buffer {
  const whole = rawTar(hostileArchive(a.extra, a.replace), a.end)
  return whole.subarray(0, Math.floor(whole.length * a.cut))
}

const cleanKey = (k: string) => !k.startsWith('/') && !k.startsWith('./') && !k.split('/').slice(0, k.endsWith('/') ? -1 : undefined).some((c) => c === '' || c === '.' || c === '..')

describe('openTarIndex on generated hostile archives', () => {
  it('ARCHIVE_INVALID, or an index of clean paths whose files read back exactly', async () => {
    const file = join(root, 'index-me.tar')
    await fc.assert(
      fc.asyncProperty(fc.array(rawEntryArb, { minLength: 1, maxLength: 10 }), fc.boolean(), async (entries, end) => {
        bump('tarIndexCases')
        const bytes = rawTar(entries, end)
        await writeFile(file, bytes)
        const ix = await typed(['ARCHIVE_INVALID'], openTarIndex(file))
        // an escaping path that the reader reaches as a header MUST be refused
        const firstLie = entries.findIndex((e) => e.declaredSize !== undefined || e.badChecksum)
        const firstEscape = entries.findIndex(escapes)
        if (firstEscape >= 0 && (firstLie < 0 || firstEscape < firstLie)) expect(ix).toBeUndefined()
        if (!ix) return
        for (const [key, e] of ix.entries) {
          expect(cleanKey(key), key).toBe(true)
          expect(e.offset + e.size).toBeLessThanOrEqual(bytes.length)
          let resolved
          try {
            resolved = ix.resolve(key)
          } catch (err) {
            expect(err).toMatchObject({ code: 'ARCHIVE_INVALID' })
            bump('linksRefused')
            continue
          }
          if (resolved) expect([...ix.entries.values()]).toContain(resolved)
          if (e.type !== 'file') continue
          // a parent component that is a link is followed (and may lead nowhere): typed too
          const got = await typed(['ARCHIVE_INVALID'], Promise.resolve().then(() => readAll(ix.open(key))))
          if (!got) {
            bump('linksRefused')
            continue
          }
          expect(got.length).toBe(e.size)
          // the last generated file of that path, when no size lied, is what reads back
          if (firstLie < 0 && resolved === e) {
            const last = [...entries].reverse().find((g) => (g.type === '0' || g.type === '7' || g.type === undefined) && g.path.replace(/^(\.?\/)+/, '').split('/').filter((c) => c && c !== '.').join('/') === key)
            if (last && !last.pax && !last.gnuLong && !last.path.includes('\0')) expect(got.equals(last.data ?? Buffer.alloc(0))).toBe(true)
          }
        }
      }),
      { numRuns: RUNS, seed },
    )
  }, 60_000 + RUNS * 300)

  it('a 60 GiB entry in a sparse archive is indexed in bounded memory and never read whole', async () => {
    const file = join(root, 'sparse.tar')
    const size = 60 * 2 ** 30
    const head = Buffer.concat([...entryBlocks({ path: 'small', data: Buffer.from('ok') }), ...entryBlocks({ path: 'big', data: Buffer.alloc(0), declaredSize: size })])
    const fh = await open(file, 'w')
    await fh.write(head, 0, head.length, 0)
    await fh.write(Buffer.alloc(1024), 0, 1024, head.length + size)
    await fh.close()
    const { value: ix, error, growth } = await peakGrowth(() => openTarIndex(file))
    expect(error).toBeUndefined()
    expect(ix!.entries.get('big')?.size).toBe(size)
    expect(growth).toBeLessThan(200 << 20)
    await expect(ix!.readFile('big')).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect((await readAll(ix!.open('big', { start: size - 16 }))).equals(Buffer.alloc(16))).toBe(true)
    expect((await ix!.readFile('small')).toString()).toBe('ok')
    // the same header in a file that is not that long: refused at once
    await writeFile(file, Buffer.concat([head, Buffer.alloc(1024)]))
    await expect(openTarIndex(file)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    figures.sparseGrowthMiB = Math.round(growth / 2 ** 20)
    await rm(file)
  })
})

describe('hostile archives through the oci-archive transport and imageLoad', () => {
  it('copyImage from a generated oci-archive: a typed error or the right image, nothing written outside', async () => {
    const wantDiffIDs = image.layers.map((l) => l.diffID)
    let n = 0
    await fc.assert(
      fc.asyncProperty(archiveArb, async (a) => {
        bump('ociArchiveCases')
        const id = n++
        const work = join(root, `copy-${id}`)
        await mkdir(work)
        const tar = join(work, 'in.tar')
        await writeFile(tar, archiveBytes(a))
        const dest = join(work, 'dest')
        const scratch = join(work, 'scratch')
        await mkdir(scratch)
        const done = await typed(
          ['ARCHIVE_INVALID', 'DIGEST_INVALID', 'SIZE_INVALID', 'MANIFEST_INVALID', 'MANIFEST_UNKNOWN', 'BLOB_UNKNOWN', 'LAYOUT_INVALID', 'UNSUPPORTED'],
          copyImage(parseImageName(`oci-archive:${tar}:latest`), parseImageName(`oci:${dest}:latest`), { sourceCtx: { tmpDir: scratch } }),
        )
        if (done) {
          bump('ociArchiveCopied')
          const content = await imageContent(parseImageName(`oci:${dest}:latest`))
          expect(content.diffIDs).toEqual(wantDiffIDs)
          expect(content.manifestDigest).toBe(image.manifestDigest)
        }
        const layout = await checkLayoutDir(dest)
        expect(layout.damage).toEqual([])
        expect(layout.leftovers).toEqual([])
        expect(await readdir(scratch)).toEqual([])
        expect((await readdir(work)).sort()).toEqual(done ? ['dest', 'in.tar', 'scratch'] : expect.arrayContaining(['in.tar', 'scratch']))
        expect(await snapshot(sentinel)).toBe(sentinelBefore)
        await rm(work, { recursive: true, force: true })
      }),
      { numRuns: RUNS, seed },
    )
  }, 60_000 + RUNS * 300)

  it('imageLoad of a generated stream: a typed error or the named image whole, nothing written outside', async () => {
    const cacheDir = join(root, 'image-cache')
    const cache = await ImageCache.open(cacheDir)
    await fc.assert(
      fc.asyncProperty(archiveArb, async (a) => {
        bump('imageLoadCases')
        const bytes = archiveBytes(a)
        const chunks: Buffer[] = []
        for (let i = 0; i < bytes.length; i += a.chunk) chunks.push(bytes.subarray(i, i + a.chunk))
        const loaded = await typed(
          ['ARCHIVE_INVALID', 'DIGEST_INVALID', 'SIZE_INVALID', 'MANIFEST_INVALID', 'CACHE_INVALID', 'BLOB_UNKNOWN', 'UNSUPPORTED'],
          cache.imageLoad(Readable.from(chunks)),
        )
        if (loaded) {
          bump('imageLoadLoaded')
          if (loaded.some((d) => d.digest === image.manifestDigest)) {
            expect(await cache.imageInCache('rel/hostile:1', image.platform, { verify: true })).toBe(true)
          }
        }
        const layout = await checkLayoutDir(cacheDir, { partialIndexes: true })
        expect(layout.damage).toEqual([])
        expect(layout.leftovers).toEqual([])
        for (const e of await cache.list()) expect(await cache.imageInCache(e.name, image.platform, { verify: true })).toBe(true)
        expect(await snapshot(sentinel)).toBe(sentinelBefore)
        // start the next case from nothing, so that every case must bring its own blobs
        await cache.clean()
        await cache.gc({ graceMs: 0 })
      }),
      { numRuns: RUNS, seed },
    )
  }, 60_000 + RUNS * 300)

  it('imageLoad of a blob declaring 1 TiB, fed 400 MiB and cut: ARCHIVE_INVALID in bounded memory, no temp file', async () => {
    const cacheDir = join(root, 'image-cache-huge')
    const cache = await ImageCache.open(cacheDir)
    const header = Buffer.concat(entryBlocks({ path: `blobs/sha256/${digestOf('never').slice(7)}`, data: Buffer.alloc(0), declaredSize: 2 ** 40 }))
    const zeros = Buffer.alloc(1 << 20)
    async function* feed() {
      yield header
      for (let i = 0; i < 400; i++) yield zeros
    }
    const { error, growth } = await peakGrowth(() => cache.imageLoad(Readable.from(feed())))
    expect(error).toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect(growth).toBeLessThan(200 << 20)
    figures.hugeBlobGrowthMiB = Math.round(growth / 2 ** 20)
    expect((await treeOf(cacheDir)).filter((p) => p.includes('.tmp-'))).toEqual([])
    // an index.json declaring 1 GiB is refused before it is read
    async function* bigIndex() {
      yield Buffer.concat(entryBlocks({ path: 'index.json', data: Buffer.alloc(0), declaredSize: 2 ** 30 }))
      for (let i = 0; i < 64; i++) yield zeros
    }
    const second = await peakGrowth(() => cache.imageLoad(Readable.from(bigIndex())))
    expect(second.error).toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect(second.growth).toBeLessThan(200 << 20)
    // a GNU long name or pax record declaring 1 GiB: refused, not buffered
    for (const type of ['L', 'x']) {
      const h = Buffer.concat(entryBlocks({ path: 'x', data: Buffer.alloc(0), declaredSize: 2 ** 30 }))
      h[156] = type.charCodeAt(0)
      let sum = 0
      h.write('        ', 148, 'latin1')
      for (let i = 0; i < 512; i++) sum += h[i]
      h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1')
      const third = await peakGrowth(() => cache.imageLoad(Readable.from([h, zeros])))
      expect(third.error).toMatchObject({ code: 'ARCHIVE_INVALID' })
      expect(third.growth).toBeLessThan(200 << 20)
      const tarFile = join(root, `meta-${type}.tar`)
      await writeFile(tarFile, Buffer.concat([h, zeros]))
      await expect(openTarIndex(tarFile)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    }
    expect(await cache.list()).toEqual([])
  })
})
