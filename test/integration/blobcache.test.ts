// The blob cache end to end, through copyImage and the dir: transport: go-blobcache.md section
// 5 (TestBlobCache, TestBlobCacheMultipleCompressedVersions and the extra checks), plus the
// guarantees beyond Go (verified entries, wrong-size and corrupt entries never served).
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { compressStream, detectCompression } from '../../src/compression.js'
import { copyImage } from '../../src/copy.js'
import { type Digest, digestHex, digestOf, isDigest } from '../../src/digest.js'
import { layerCompressionOf, parseManifest } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { DirReference } from '../../src/transports/dir.js'
import type { ImageManifest } from '../../src/manifest.js'
import type { LayerCompression } from '../../src/types.js'
import { readAll, testDir } from '../helpers/conformance.js'
import { makeLayer } from '../helpers/make-layer.js'

type LayerKind = 'uncompressed' | 'gzip' | 'zstd'

async function zstd(data: Buffer): Promise<Buffer> {
  return readAll(Readable.from([data]).pipe(compressStream('zstd')))
}

/** The image of Go's TestBlobCache: one layer holding `layer-content-<n>` = that name repeated. */
async function makeImage(repeat: number, kind: LayerKind, n = repeat) {
  const name = `layer-content-${n}`
  const tar = makeLayer([{ name, content: name.repeat(repeat) }])
  const diffID = digestOf(tar)
  const layer = kind === 'gzip' ? gzipSync(tar) : kind === 'zstd' ? await zstd(tar) : tar
  const layerDigest = digestOf(layer)
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [diffID] } }))
  const layerType: string = kind === 'gzip' ? MediaType.ociLayerGzip : kind === 'zstd' ? MediaType.ociLayerZstd : MediaType.ociLayer
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: [{ mediaType: layerType, digest: layerDigest, size: layer.length }],
  }))
  return { tar, diffID, layer, layerDigest, layerType, config, configDigest: digestOf(config), manifest, manifestDigest: digestOf(manifest) }
}
type TestImage = Awaited<ReturnType<typeof makeImage>>

/** PutBlob(layer), PutBlob(config), PutManifest, Commit, Close through a cache-wrapped dir: destination. */
async function writeThroughCache(image: TestImage, cache: BlobCache): Promise<void> {
  const dest = await cache.newImageDestination()
  try {
    await dest.putBlob(Readable.from([image.layer]), { digest: image.layerDigest, size: image.layer.length, mediaType: image.layerType })
    await dest.putBlob(Readable.from([image.config]), { digest: image.configDigest, size: image.config.length }, { isConfig: true })
    await dest.putManifest(image.manifest)
    await dest.commit()
  } finally {
    await dest.close()
  }
}

/** Removes every file of a dir: image except manifest*, as Go's test does. */
async function strip(dir: string): Promise<void> {
  for (const name of await readdir(dir)) if (!name.startsWith('manifest')) await rm(join(dir, name))
}

/** Checks every blob of a copied dir: image: it hashes to its name and its media type matches its bytes. */
async function checkImage(dir: string): Promise<ImageManifest> {
  const parsed = parseManifest(await readFile(join(dir, 'manifest.json')))
  if (parsed.kind !== 'image') throw new Error('not an image')
  const m = parsed.manifest
  for (const d of [m.config, ...m.layers]) {
    const bytes = await readFile(join(dir, digestHex(d.digest)))
    expect(digestOf(bytes)).toBe(d.digest)
    expect(bytes.length).toBe(d.size)
  }
  for (const l of m.layers) {
    const head = (await readFile(join(dir, digestHex(l.digest)))).subarray(0, 8)
    expect(detectCompression(head)).toBe(layerCompressionOf(l.mediaType))
  }
  return m
}

const entries = async (dir: string) => (await readdir(dir)).sort()

describe('TestBlobCache', () => {
  let root: string
  let cacheDir: string
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'blobcache-matrix-'))
    cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
  })
  afterAll(async () => {
    await rm(root, { recursive: true, force: true })
  })

  const cases: [number, LayerCompression, LayerKind][] = []
  for (const repeat of [1, 10000]) {
    for (const mode of ['preserve', 'compress', 'decompress'] as const) {
      for (const kind of ['uncompressed', 'gzip', 'zstd'] as const) cases.push([repeat, mode, kind])
    }
  }

  it.each(cases)('repeat %i, %s, %s layer', async (repeat, mode, kind) => {
    const caseDir = join(root, `${repeat}-${mode}-${kind}`)
    const srcDir = join(caseDir, 'src')
    const image = await makeImage(repeat, kind)
    const cache = new BlobCache(new DirReference(srcDir), cacheDir, mode)

    // 1. exactly 3 entries (uncompressed layer) or 6 (compressed), plus the variant and its
    //    notes that compress mode makes for an uncompressed layer
    await writeThroughCache(image, cache)
    const names = await entries(cacheDir)
    const { layerDigest: C, diffID: U, configDigest: K, manifestDigest: M } = image
    if (kind === 'uncompressed' && mode !== 'compress') {
      expect(names).toEqual([U, `${K}.config`, M].sort())
    } else if (kind === 'uncompressed') {
      expect(names).toHaveLength(6)
      const variant = names.find((n) => isDigest(n) && ![U, M].includes(n as Digest)) as Digest
      expect(names).toEqual([U, `${U}.compressed`, variant, `${variant}.decompressed`, `${K}.config`, M].sort())
      expect(await readFile(join(cacheDir, `${U}.compressed`), 'utf8')).toBe(variant) // one gzip variant: legacy form
    } else {
      expect(names).toEqual([C, `${C}.decompressed`, U, `${U}.compressed`, `${K}.config`, M].sort())
      // 3. the note names the layer and its algorithm (a lone gzip variant in the legacy form)
      expect(await readFile(join(cacheDir, `${U}.compressed`), 'utf8')).toBe(kind === 'gzip' ? C : `${C} zstd`)
      expect(await readFile(join(cacheDir, `${C}.decompressed`), 'utf8')).toBe(U)
    }

    // 2. every entry named by a digest hashes to its name
    for (const n of names) {
      const d = n.replace(/\.config$/, '')
      if (isDigest(d)) expect(digestOf(await readFile(join(cacheDir, n)))).toBe(d)
    }

    // 4. with the source stripped of its blobs, a plain copy fails
    await strip(srcDir)
    await expect(copyImage(new DirReference(srcDir), new DirReference(join(caseDir, 'plain')))).rejects.toMatchObject({
      code: 'BLOB_UNKNOWN',
    })

    // 5. and a copy through the cache succeeds, with media types that match the bytes
    const outDir = join(caseDir, 'out')
    const result = await copyImage(cache, new DirReference(outDir))
    const copied = await checkImage(outDir)
    const layer = copied.layers[0]
    if (mode === 'decompress' && kind !== 'uncompressed') expect(layer).toMatchObject({ digest: U, mediaType: MediaType.ociLayer })
    else if (mode === 'compress' && kind === 'uncompressed') expect(layer).toMatchObject({ mediaType: MediaType.ociLayerGzip })
    else expect(layer).toMatchObject({ digest: C, mediaType: image.layerType })
    expect(result.digest).toBe(digestOf(await readFile(join(outDir, 'manifest.json'))))
    expect(cache.stats.errors).toBe(0)
    expect(cache.stats.hits).toBeGreaterThanOrEqual(2)

    // 6. clearCache empties the directory
    await cache.clearCache()
    expect(await readdir(cacheDir)).toEqual([])
  })
})

describe('TestBlobCacheMultipleCompressedVersions', () => {
  it('records every variant in one note and substitutes by algorithm', async () => {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const plain = await makeImage(100, 'uncompressed', 7)
    const gz = await makeImage(100, 'gzip', 7)
    const zs = await makeImage(100, 'zstd', 7)
    expect(new Set([plain.diffID, gz.diffID, zs.diffID]).size).toBe(1)
    for (const [i, image] of [plain, gz, zs].entries()) {
      await writeThroughCache(image, new BlobCache(new DirReference(join(root, `img${i}`)), cacheDir, 'preserve'))
    }
    // 7. exactly two entries: {gzip digest: gzip, zstd digest: zstd}
    const note = (await readFile(join(cacheDir, `${plain.diffID}.compressed`), 'utf8')).split('\n').sort()
    expect(note).toEqual([`${gz.layerDigest} gzip`, `${zs.layerDigest} zstd`].sort())

    // 8. layerInfosForCopy on the uncompressed image
    const src = join(root, 'img0')
    const layersFor = async (mode: LayerCompression, compressAlgorithm?: 'gzip' | 'zstd') => {
      const s = await new BlobCache(new DirReference(src), cacheDir, mode, { compressAlgorithm }).newImageSource()
      try {
        return await s.layerInfosForCopy!()
      } finally {
        await s.close()
      }
    }
    expect(await layersFor('compress', 'gzip')).toMatchObject([{ digest: gz.layerDigest, mediaType: MediaType.ociLayerGzip }])
    expect(await layersFor('compress', 'zstd')).toMatchObject([{ digest: zs.layerDigest, mediaType: MediaType.ociLayerZstd }])
    expect(await layersFor('compress')).toMatchObject([{ digest: gz.layerDigest, compressionAlgorithm: 'gzip' }])
    const decompressed = await layersFor('decompress')
    expect(decompressed === undefined || decompressed[0].digest === plain.diffID).toBe(true) // unchanged: diffID, tar
    expect(await layersFor('preserve')).toBeUndefined()

    // and copies pick the variant asked for
    const out = join(root, 'out-zstd')
    await copyImage(new BlobCache(new DirReference(src), cacheDir, 'compress', { compressAlgorithm: 'zstd' }), new DirReference(out))
    expect((await checkImage(out)).layers[0]).toMatchObject({ digest: zs.layerDigest, mediaType: MediaType.ociLayerZstd })
  })
})

describe('blob cache extra checks', () => {
  async function cachedImage(kind: LayerKind, mode: LayerCompression = 'preserve') {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const image = await makeImage(50, kind)
    const srcDir = join(root, 'src')
    await writeThroughCache(image, new BlobCache(new DirReference(srcDir), cacheDir, mode))
    return { root, cacheDir, image, srcDir }
  }

  it('a signed source is never substituted', async () => {
    const { root, cacheDir, srcDir } = await cachedImage('gzip')
    await writeFile(join(srcDir, 'signature-1'), 'signature')
    const cache = new BlobCache(new DirReference(srcDir), cacheDir, 'decompress')
    const src = await cache.newImageSource()
    expect(await src.layerInfosForCopy!()).toBeUndefined()
    await src.close()
    const out = join(root, 'out')
    await copyImage(cache, new DirReference(out))
    expect(await readFile(join(out, 'signature-1'), 'utf8')).toBe('signature')
  })

  it('a Docker schema 2 image is not decompressed, and is compressed as diff.tar.gzip', async () => {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const image = await makeImage(50, 'gzip')
    const docker = JSON.parse(image.manifest.toString())
    docker.mediaType = MediaType.dockerManifest
    docker.config.mediaType = MediaType.dockerConfig
    docker.layers[0].mediaType = MediaType.dockerLayerGzip
    const manifest = Buffer.from(JSON.stringify(docker))
    await writeThroughCache({ ...image, manifest, layerType: MediaType.dockerLayerGzip }, new BlobCache(new DirReference(join(root, 'src')), cacheDir))
    const src = await new BlobCache(new DirReference(join(root, 'src')), cacheDir, 'decompress').newImageSource()
    expect(await src.layerInfosForCopy!()).toBeUndefined()
    await src.close()
  })

  it('a copy into a cache-wrapped destination reuses cached blobs the source lost (tryReusingBlob)', async () => {
    const { root, cacheDir, image, srcDir } = await cachedImage('gzip')
    await strip(srcDir)
    const out = join(root, 'out')
    const cache = new BlobCache(new DirReference(out), cacheDir)
    const result = await copyImage(new DirReference(srcDir), cache)
    expect(result.reused).toBe(2)
    expect(await readFile(join(out, digestHex(image.layerDigest)))).toEqual(image.layer)
    expect(cache.stats.hits).toBe(2)
  })

  it('wrong-size and corrupt entries are never served: the copy falls back to the source or fails cleanly', async () => {
    const { root, cacheDir, image, srcDir } = await cachedImage('gzip')
    // a new file in the entry's place: written in place, it would change the image written
    // through the cache too, which shares the entry's inode (a hard link)
    await rm(join(cacheDir, image.layerDigest))
    await writeFile(join(cacheDir, image.layerDigest), image.layer.subarray(0, 20)) // truncated
    const cache = new BlobCache(new DirReference(srcDir), cacheDir)
    await copyImage(cache, new DirReference(join(root, 'out1')))
    expect(await readFile(join(root, 'out1', digestHex(image.layerDigest)))).toEqual(image.layer)
    expect(await entries(cacheDir)).not.toContain(image.layerDigest)

    const corrupt = Buffer.from(image.config)
    corrupt[0] ^= 0x20
    await rm(join(cacheDir, `${image.configDigest}.config`))
    await writeFile(join(cacheDir, `${image.configDigest}.config`), corrupt)
    const verify = await cache.verify()
    expect(verify.removed).toEqual([`${image.configDigest}.config`])
    await copyImage(cache, new DirReference(join(root, 'out2')))
    await checkImage(join(root, 'out2'))
  })

  it('a cache that cannot be written never fails the copy and counts the failures', async () => {
    const root = await testDir()
    const image = await makeImage(50, 'gzip')
    const srcDir = join(root, 'src')
    await writeThroughCache(image, new BlobCache(new DirReference(srcDir), join(root, 'cache-a')))
    await writeFile(join(root, 'not-a-dir'), 'x')
    for (const bad of [join(root, 'missing'), join(root, 'not-a-dir')]) {
      const out = join(root, `out-${bad.length}`)
      const cache = new BlobCache(new DirReference(out), bad)
      await copyImage(new DirReference(srcDir), cache)
      await checkImage(out)
      expect(cache.stats.errors).toBe(3) // layer, config, manifest
    }
  })

  // As root a read-only directory is writable anyway, so "no permission" is tested for real:
  // the copy runs (the built package) as the unprivileged user nobody, on a cache directory
  // owned by root with mode 0755.
  const DIST = resolve(__dirname, '../../dist/index.js')
  it.skipIf(process.getuid?.() !== 0 || !existsSync(DIST))('a cache the process may not write (EACCES) never fails the copy, and is counted', async () => {
    const root = await testDir()
    await chmod(root, 0o755)
    const image = await makeImage(50, 'gzip')
    const srcDir = join(root, 'src')
    await writeThroughCache(image, new BlobCache(new DirReference(srcDir), join(root, 'cache-a')))
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir, { mode: 0o755 })
    await mkdir(join(root, 'outputs'), { mode: 0o777 })
    await chmod(join(root, 'outputs'), 0o777)
    const script = join(root, 'child.mjs')
    await writeFile(script, `
import { BlobCache, copyImage, dir } from ${JSON.stringify(DIST)}
const [src, out, cacheDir] = process.argv.slice(2)
const from = new BlobCache(dir.parseReference(src), cacheDir)
const to = new BlobCache(dir.parseReference(out), cacheDir)
const r = await copyImage(from, to)
process.stdout.write(JSON.stringify({ digest: r.digest, from: from.stats, to: to.stats }))
`)
    const out = join(root, 'outputs', 'out')
    const r = spawnSync(process.execPath, [script, srcDir, out, cacheDir], { uid: 65534, gid: 65534, encoding: 'utf8' })
    expect(r.stderr).toBe('')
    expect(r.status).toBe(0)
    const result = JSON.parse(r.stdout)
    expect(result.digest).toBe(image.manifestDigest)
    expect(result.to.errors).toBe(3) // layer, config and manifest could not be cached
    expect(result.from).toMatchObject({ hits: 0, errors: 0 })
    await checkImage(out)
    expect(await readdir(cacheDir)).toEqual([])
  })

  it('a cold copy from a local layout reads each blob from its file, never through the source\'s stream, one miss each', async () => {
    class CountingDir extends DirReference {
      streams = 0
      override async newImageSource(...args: Parameters<DirReference['newImageSource']>) {
        const src = await super.newImageSource(...args)
        const getBlob = src.getBlob.bind(src)
        src.getBlob = (info, opts) => {
          this.streams++
          return getBlob(info, opts)
        }
        return src
      }
    }
    const root = await testDir()
    const image = await makeImage(100_000, 'gzip')
    const srcDir = join(root, 'src')
    await writeThroughCache(image, new BlobCache(new DirReference(srcDir), join(root, 'filler')))
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const counting = new CountingDir(srcDir)
    const from = new BlobCache(counting, cacheDir)
    const to = new BlobCache(new DirReference(join(root, 'out')), cacheDir)
    const r = await copyImage(from, to)
    expect(r.digest).toBe(image.manifestDigest)
    await checkImage(join(root, 'out'))
    expect(counting.streams).toBe(0)
    expect(from.stats).toMatchObject({ hits: 0, misses: 3, errors: 0 }) // manifest, config, layer
    expect(to.stats.errors).toBe(0)
    const names = await readdir(cacheDir)
    for (const name of [image.layerDigest, `${image.layerDigest}.decompressed`, image.diffID, `${image.diffID}.compressed`, `${image.configDigest}.config`]) {
      expect(names).toContain(name)
    }
    expect(digestOf(await readFile(join(cacheDir, image.diffID)))).toBe(image.diffID)
    // a source file that does not match its digest fails the copy, and nothing is named by it
    const bad = Buffer.from(image.layer)
    bad[bad.length - 20] ^= 0xff
    await writeFile(join(srcDir, digestHex(image.layerDigest)), bad)
    await rm(cacheDir, { recursive: true })
    await mkdir(cacheDir)
    await expect(copyImage(new BlobCache(new DirReference(srcDir), cacheDir), new BlobCache(new DirReference(join(root, 'out2')), cacheDir))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect((await readdir(cacheDir)).filter((n) => n.includes(digestHex(image.layerDigest)) || n.startsWith('.tmp-'))).toEqual([])
  })

  it('the copy streams a cached hit into a fresh dir: by file copy', async () => {
    const { root, cacheDir, image, srcDir } = await cachedImage('zstd')
    await strip(srcDir)
    const events: string[] = []
    await copyImage(new BlobCache(new DirReference(srcDir), cacheDir), new DirReference(join(root, 'out')), {
      onProgress: (e) => events.push(e.type),
    })
    expect(await readFile(join(root, 'out', digestHex(image.layerDigest)))).toEqual(image.layer)
    expect(events.filter((t) => t === 'done')).toHaveLength(2)
  })
})
