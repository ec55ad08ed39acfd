// Disk full: a 2 MiB tmpfs, mounted by the test when it runs as root (`.ci/run` does), holds the
// blob-cache directory while images several times that size are copied through it. The cache is
// best effort: every copy succeeds, and what the cache keeps is whole, with no partial or
// temporary file left. Destinations on a full disk fail instead, and leave nothing half-written.
// Not root (or no tmpfs allowed): skipped with a notice.
import { execFileSync } from 'node:child_process'
import { createReadStream } from 'node:fs'
import { mkdir, mkdtemp, readFile, readdir, rm, statfs, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { copyImage } from '../../src/copy.js'
import { isImageError } from '../../src/errors.js'
import { ImageCache } from '../../src/image-cache/index.js'
import { OciArchiveReference } from '../../src/transports/oci-archive.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import { recordFigures } from '../helpers/children.js'
import { checkBlobCacheDir, checkLayoutDir, entryNames, treeOf } from '../helpers/invariants.js'
import { peersRequired } from '../helpers/peers.js'
import { standardImages, writeArchive, writeSourceLayout } from '../helpers/reliability-fixtures.js'
import type { RandomImage } from '../helpers/random-image.js'

const isRoot = process.getuid?.() === 0
if (!isRoot) console.warn('disk-full tests skipped: they mount a tmpfs, which needs root (CI runs as root)')

async function available(dir: string): Promise<number> {
  const s = await statfs(dir)
  return s.bavail * s.bsize
}

describe.skipIf(!isRoot)('a full disk under the blob cache', () => {
  let root: string
  let mnt: string
  let mounted = false
  let images: RandomImage[]
  const figures = { copies: 0, cacheWriteErrors: 0, destinationFailures: 0, corrupt: 0, leftovers: 0 }

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'blobcache-rel-full-'))
    mnt = join(root, 'fs')
    await mkdir(mnt)
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mnt], { stdio: 'pipe' })
      mounted = true
    } catch (err) {
      const why = `cannot mount a tmpfs (${(err as Error).message.split('\n')[0]})`
      if (peersRequired()) throw new Error(`disk-full tests: ${why}, and BLOBCACHE_REQUIRE_PEERS=1 forbids skipping them`)
      console.warn(`disk-full tests skipped: ${why}`)
    }
    images = await standardImages(0.8) // about 4.5 MiB of blobs, more with the cache's variants
    await writeSourceLayout(join(root, 'src'), images)
  })
  afterAll(async () => {
    if (mounted) {
      try {
        execFileSync('umount', [mnt], { stdio: 'pipe' })
      } catch {
        execFileSync('umount', ['-l', mnt], { stdio: 'pipe' })
      }
    }
    if (root) await rm(root, { recursive: true, force: true })
    console.log(JSON.stringify(recordFigures('disk-full', figures)))
  })

  /** A fresh directory on the tmpfs, emptied afterwards so the next test has the space. */
  async function onTmpfs(name: string): Promise<string> {
    const dir = join(mnt, name)
    await mkdir(dir)
    return dir
  }
  async function clearTmpfs(): Promise<void> {
    for (const n of await readdir(mnt)) await rm(join(mnt, n), { recursive: true, force: true })
  }

  it('copies through a cache that fills the disk all succeed; the cache keeps only whole entries', async (ctx) => {
    if (!mounted) ctx.skip()
    const cacheDir = await onTmpfs('cache')
    try {
      const dest = join(root, 'dest-1')
      const again = join(root, 'dest-2')
      let errors = 0
      for (const mode of ['compress', 'decompress'] as const) {
        for (const [i] of images.entries()) {
          const from = new BlobCache(new OciLayoutReference(join(root, 'src'), `img-${i}`), cacheDir, mode, { compressAlgorithm: i % 2 ? 'zstd' : 'gzip' })
          const to = new BlobCache(new OciLayoutReference(mode === 'compress' ? dest : again, `img-${i}`), cacheDir, mode)
          await copyImage(from, to)
          errors += from.stats.errors + to.stats.errors
          figures.copies++
        }
      }
      // the disk did fill up, and the cache said so in its counters (never in the copies)
      const biggest = Math.max(...images.flatMap((im) => [...im.blobs.values()].map((b) => b.length)))
      expect(await available(cacheDir)).toBeLessThan(biggest)
      expect(errors).toBeGreaterThan(0)
      figures.cacheWriteErrors += errors
      for (const d of [dest, again]) {
        const report = await checkLayoutDir(d)
        expect(report.damage).toEqual([])
        expect(entryNames(report)).toEqual(images.map((_, i) => `img-${i}`))
      }
      // reading back through the full cache still gives whole images
      const third = join(root, 'dest-3')
      for (const [i] of images.entries()) {
        await copyImage(new BlobCache(new OciLayoutReference(dest, `img-${i}`), cacheDir, 'compress'), new OciLayoutReference(third, `img-${i}`))
        figures.copies++
      }
      expect((await checkLayoutDir(third)).damage).toEqual([])
      const cache = await checkBlobCacheDir(cacheDir)
      figures.corrupt += cache.damage.length
      figures.leftovers += cache.leftovers.length
      expect(cache.damage).toEqual([])
      expect(cache.leftovers).toEqual([])
      expect(cache.hashed).toBeGreaterThan(0)
    } finally {
      await clearTmpfs()
    }
  })

  it('a cache directory on a disk that is already full: copies succeed, nothing partial is kept', async (ctx) => {
    if (!mounted) ctx.skip()
    const cacheDir = await onTmpfs('cache')
    try {
      await writeFile(join(mnt, 'filler'), Buffer.alloc(Math.max(0, (await available(mnt)) - 4096)))
      const dest = join(root, 'dest-full')
      for (const [i] of images.entries()) {
        const from = new BlobCache(new OciLayoutReference(join(root, 'src'), `img-${i}`), cacheDir, 'compress')
        await copyImage(from, new BlobCache(new OciLayoutReference(dest, `img-${i}`), cacheDir, 'compress'))
        figures.copies++
      }
      expect(entryNames(await checkLayoutDir(dest))).toEqual(images.map((_, i) => `img-${i}`))
      const cache = await checkBlobCacheDir(cacheDir)
      expect(cache.damage).toEqual([])
      expect(cache.leftovers).toEqual([])
    } finally {
      await clearTmpfs()
    }
  })

  it('an oci: destination on a full disk fails, leaving no temporary file and an index.json without the image', async (ctx) => {
    if (!mounted) ctx.skip()
    const dest = await onTmpfs('layout')
    try {
      await copyImage(new OciLayoutReference(join(root, 'src'), 'img-2'), new OciLayoutReference(dest, 'small'))
      const err = await copyImage(new OciLayoutReference(join(root, 'src'), 'img-0'), new OciLayoutReference(dest, 'big')).then(
        () => undefined,
        (e: unknown) => e,
      )
      expect(err).toBeDefined()
      expect(isImageError(err) || (err as NodeJS.ErrnoException).code === 'ENOSPC').toBe(true)
      figures.destinationFailures++
      const report = await checkLayoutDir(dest)
      expect(report.damage).toEqual([])
      expect(report.leftovers).toEqual([])
      expect(entryNames(report)).toEqual(['small'])
    } finally {
      await clearTmpfs()
    }
  })

  it('an oci-archive: destination on a full disk fails, leaving the archive that was there and no temporary file', async (ctx) => {
    if (!mounted) ctx.skip()
    const dir = await onTmpfs('archive')
    try {
      const target = join(dir, 'image.tar')
      await writeFile(target, 'the archive that was there')
      // the archive would fit in the 2 MiB: leave it 256 KiB
      await writeFile(join(dir, 'filler'), Buffer.alloc(Math.max(0, (await available(dir)) - (256 << 10))))
      // staged in the test's directory, packed onto the full disk at commit
      const err = await copyImage(new OciLayoutReference(join(root, 'src'), 'img-0'), new OciArchiveReference(target, 'big'), {
        destCtx: { tmpDir: root },
      }).then(
        () => undefined,
        (e: unknown) => e,
      )
      expect((err as NodeJS.ErrnoException | undefined)?.code).toBe('ENOSPC')
      figures.destinationFailures++
      expect((await readdir(dir)).sort()).toEqual(['filler', 'image.tar'])
      expect(await readFile(target, 'utf8')).toBe('the archive that was there')
    } finally {
      await clearTmpfs()
    }
  })

  it('an ImageCache on a full disk: imageLoad fails, no temporary file, the names it had stay whole', async (ctx) => {
    if (!mounted) ctx.skip()
    const dir = await onTmpfs('image-cache')
    try {
      const cache = await ImageCache.open(dir)
      await cache.imageLoad(createReadStream(await writeArchive(join(root, 'small.tar'), images[2], 'docker.io/rel/small:1')))
      const big = await writeArchive(join(root, 'big.tar'), images[0], 'docker.io/rel/big:1')
      const err = await cache.imageLoad(createReadStream(big)).then(() => undefined, (e: unknown) => e)
      expect(err).toBeDefined()
      expect(isImageError(err) || (err as NodeJS.ErrnoException).code === 'ENOSPC').toBe(true)
      figures.destinationFailures++
      const report = await checkLayoutDir(dir, { partialIndexes: true })
      expect(report.damage).toEqual([])
      expect(report.leftovers).toEqual([])
      expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/rel/small:1'])
      expect(await cache.imageInCache('rel/small:1', 'linux/amd64', { verify: true })).toBe(true)
      expect((await treeOf(dir)).filter((n) => n.includes('.tmp-'))).toEqual([])
    } finally {
      await clearTmpfs()
    }
  })
})
