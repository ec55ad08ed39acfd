// How BlobCache's source and destination use a shared tier: what they ask it (fetchInto,
// lookup) and what they give it (enqueue), against a stand-in tier object holding blobs in
// memory. The tier itself, against the real registry, is tested in shared/ and test/integration/.
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gunzipSync, gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { makeLayer } from '../../test/helpers/make-layer.js'
import { writeRandomImage } from '../../test/helpers/random-image.js'
import { type Digest, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { DirReference } from '../transports/dir.js'
import { parseDockerReference } from '../transports/docker.js'
import { entryName } from './files.js'
import { BlobCache, cacheLookupReferenceFunc } from './reference.js'
import type { SharedEntry } from './shared/format.js'
import type { SharedStats, SharedTier } from './shared/tier.js'
import { emptySharedStats } from './stats.js'

/** A tier in memory: blobs with their entries; records every enqueue and fetch. */
class FakeTier {
  readonly registry = '127.0.0.1:5000'
  readonly repository = 'cache/blobs'
  readonly name = 'docker://127.0.0.1:5000/cache/blobs'
  readonly blobs = new Map<Digest, { bytes: Buffer; entry: SharedEntry }>()
  readonly enqueued: { name: string; kind?: string; mountFrom?: string }[] = []
  readonly fetched: Digest[] = []
  readonly counts: SharedStats = emptySharedStats()

  add(bytes: Buffer, extra: Partial<SharedEntry> = {}): Digest {
    const digest = digestOf(bytes)
    this.blobs.set(digest, { bytes, entry: { digest, size: bytes.length, kind: 'layer', compressed: new Map(), ...extra } })
    return digest
  }

  get stats(): SharedStats {
    return { ...this.counts }
  }

  async lookup(digest: Digest): Promise<SharedEntry | undefined> {
    return this.blobs.get(digest)?.entry
  }

  async fetchInto(dir: string, digest: Digest, size: number) {
    this.fetched.push(digest)
    const blob = this.blobs.get(digest)
    if (!blob || (size >= 0 && size !== blob.bytes.length)) {
      this.counts.misses++
      return undefined
    }
    this.counts.hits++
    const isConfig = blob.entry.kind === 'config'
    const name = entryName(digest, isConfig)
    await writeFile(join(dir, name), blob.bytes)
    return { path: join(dir, name), name, size: blob.bytes.length, isConfig }
  }

  enqueue(_dir: string, name: string, hints: { kind?: 'manifest'; mountFrom?: string } = {}): void {
    this.enqueued.push({ name, ...hints })
  }

  async flush(): Promise<SharedStats> {
    return this.stats
  }

  get names(): string[] {
    return this.enqueued.map((e) => e.name)
  }
}

const asTier = (t: FakeTier) => t as unknown as SharedTier

/** A one-layer gzip image in dir:, an empty cache directory, and a tier holding every blob of the image. */
async function setup(mode: 'preserve' | 'compress' | 'decompress' = 'preserve') {
  const root = await testDir()
  const ref = new DirReference(join(root, 'image'))
  const image = await writeRandomImage(ref, { layers: 1, compression: 'gzip' })
  const cacheDir = join(root, 'cache')
  await mkdir(cacheDir)
  const tier = new FakeTier()
  for (const [digest, bytes] of image.blobs) tier.add(bytes, { kind: digest === image.configDigest ? 'config' : 'layer' })
  const cache = new BlobCache(ref, cacheDir, mode, { shared: asTier(tier) })
  return { root, ref, image, cacheDir, tier, cache, layer: image.layers[0] }
}

describe('BlobCache with a shared tier', () => {
  it('reports the tier, its stats, and flushes it; without one, flush resolves zeros and stats stay as they were', async () => {
    const { cache, tier } = await setup()
    expect(cache.shared).toBe(tier)
    expect(cache.stats).toEqual({ hits: 0, misses: 0, errors: 0, shared: emptySharedStats() })
    expect(await cache.flush()).toEqual(emptySharedStats())
    const plain = new BlobCache(new DirReference('/tmp/x'), '/tmp/cache')
    expect(plain.shared).toBeUndefined()
    expect(Object.keys(plain.stats)).toEqual(['hits', 'misses', 'errors'])
    expect(await plain.flush()).toEqual(emptySharedStats())
  })

  it('makes a tier from a name, REFERENCE_INVALID for a bad one; cacheLookupReferenceFunc shares one tier', () => {
    const ref = new DirReference('/tmp/x')
    const cache = new BlobCache(ref, '/tmp/cache', 'preserve', { shared: 'docker://127.0.0.1:5999/cache/blobs' })
    expect(cache.shared?.name).toBe('docker://127.0.0.1:5999/cache/blobs')
    expect(() => new BlobCache(ref, '/tmp/cache', 'preserve', { shared: 'docker://127.0.0.1:5999/cache/blobs:tag' })).toThrow(
      expect.objectContaining({ code: 'REFERENCE_INVALID' }),
    )
    expect(() => cacheLookupReferenceFunc('/tmp/cache', 'preserve', { shared: 'oci:/x' })).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    const wrap = cacheLookupReferenceFunc('/tmp/cache', 'preserve', { shared: 'docker://127.0.0.1:5999/cache/blobs' })
    const [a, b] = [wrap(ref), wrap(new DirReference('/tmp/y'))]
    expect(a.shared).toBeDefined()
    expect(a.shared).toBe(b.shared)
  })

  it('mounts from the wrapped repository when it is on the tier registry, else from nowhere', () => {
    const tier = new FakeTier()
    const digest = digestOf('blob')
    const same = new BlobCache(parseDockerReference('//127.0.0.1:5000/team/app:1'), '/tmp/c', 'preserve', { shared: asTier(tier) })
    same.share(digest, { fromInner: true })
    same.share(digest) // a derived entry never went through the wrapped reference
    const other = new BlobCache(parseDockerReference('//127.0.0.1:6000/team/app:1'), '/tmp/c', 'preserve', { shared: asTier(tier) })
    other.share(`${digest}.config`, { fromInner: true })
    expect(tier.enqueued).toEqual([{ name: digest, mountFrom: 'team/app' }, { name: digest }, { name: `${digest}.config` }])
  })
})

describe('BlobCacheSource with a shared tier', () => {
  it('getBlob: a local miss is fetched from the tier, kept in the directory and served, the source untouched', async () => {
    const { cache, cacheDir, ref, image, tier, layer } = await setup()
    await rm(ref.blobPath(layer.digest))
    const src = await cache.newImageSource()
    const { stream, size } = await src.getBlob({ digest: layer.digest, size: layer.size })
    expect(size).toBe(layer.size)
    expect(await readAll(stream)).toEqual(image.blobs.get(layer.digest))
    expect(await readFile(join(cacheDir, layer.digest))).toEqual(image.blobs.get(layer.digest))
    expect(cache.stats).toMatchObject({ hits: 1, misses: 0, shared: { hits: 1 } })
    // now a local hit: the tier is not asked again
    await readAll((await src.getBlob({ digest: layer.digest, size: layer.size })).stream)
    expect(tier.fetched).toEqual([layer.digest])
    await src.close()
  })

  it('getBlob: what the tier lacks (or has at another size) comes from the wrapped source', async () => {
    const { cache, image, tier, layer } = await setup()
    tier.blobs.clear()
    tier.add(Buffer.from('not the layer'))
    const src = await cache.newImageSource()
    expect(await readAll((await src.getBlob({ digest: layer.digest, size: layer.size })).stream)).toEqual(image.blobs.get(layer.digest))
    expect(cache.stats).toMatchObject({ hits: 0, misses: 1 })
  })

  it('getVerifiedBlobPath and getBlobAt fetch from the tier; the config lands as <digest>.config', async () => {
    const { cache, cacheDir, image, layer, ref } = await setup()
    await rm(ref.blobPath(layer.digest))
    const src = await cache.newImageSource()
    const path = await src.getVerifiedBlobPath!({ digest: image.configDigest, size: -1 })
    expect(path).toBe(join(cacheDir, `${image.configDigest}.config`))
    const parts: Buffer[] = []
    for await (const s of src.getBlobAt!({ digest: layer.digest, size: layer.size }, [{ offset: 0, length: 5 }])) parts.push(await readAll(s))
    expect(parts).toEqual([image.blobs.get(layer.digest)!.subarray(0, 5)])
    expect(cache.stats).toMatchObject({ hits: 2, misses: 0 })
  })

  it('getManifest(instance) fetches the manifest from the tier', async () => {
    const { cache, image, tier } = await setup()
    tier.add(image.manifest, { kind: 'manifest' })
    const src = await cache.newImageSource()
    expect(await src.getManifest(image.manifestDigest)).toEqual({ bytes: image.manifest, mediaType: image.mediaType })
    expect(cache.stats).toMatchObject({ hits: 1, misses: 0 })
  })

  it('layerInfosForCopy substitutes a variant only the tier holds, fetching it first; one it cannot fetch is not offered', async () => {
    const root = await testDir()
    const ref = new DirReference(join(root, 'image'))
    const image = await writeRandomImage(ref, { layers: 1, compression: null })
    const layerDigest = image.layers[0].digest
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const tier = new FakeTier()
    // the tier knows a gzip variant of the image's layer
    const layerBytes = image.blobs.get(layerDigest)!
    const gz = gzipSync(layerBytes)
    const G = digestOf(gz)
    tier.add(layerBytes, { compressed: new Map([[G, 'gzip']]) })
    tier.blobs.set(G, { bytes: gz, entry: { digest: G, size: gz.length, kind: 'layer', compression: 'gzip', decompressed: layerDigest, compressed: new Map() } })
    const src = await new BlobCache(ref, cacheDir, 'compress', { shared: asTier(tier) }).newImageSource()
    expect(await src.layerInfosForCopy!()).toMatchObject([{ digest: G, size: gz.length, mediaType: MediaType.ociLayerGzip }])
    expect(await readFile(join(cacheDir, G))).toEqual(gz)
    // the tier now fails to deliver the variant: no substitution
    await rm(join(cacheDir, G))
    tier.blobs.get(G)!.bytes = Buffer.from('truncated')
    tier.blobs.get(G)!.entry.size = gz.length
    const again = await new BlobCache(ref, cacheDir, 'compress', { shared: asTier(tier) }).newImageSource()
    expect(await again.layerInfosForCopy!()).toBeUndefined()
  })
})

describe('BlobCacheDestination with a shared tier', () => {
  const tar = makeLayer([{ name: 'layer', content: 'layer '.repeat(400) }])
  const gz = gzipSync(tar)
  const info = (b: Buffer) => ({ digest: digestOf(b), size: b.length })

  it('queues what it stores: a compressed layer and its decompressed form, a config, a manifest', async () => {
    const { cache, tier } = await setup()
    const dest = await cache.newImageDestination()
    await dest.putBlob(Readable.from([gz]), info(gz))
    const config = Buffer.from('{"rootfs":{}}')
    await dest.putBlob(Readable.from([config]), info(config), { isConfig: true })
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, layers: [] }))
    await dest.putManifest(manifest)
    // an entry already cached is queued again (the tier deduplicates)
    await dest.putBlob(Readable.from([gz]), info(gz))
    await dest.close()
    expect(tier.enqueued).toEqual([
      { name: digestOf(gz) },
      { name: digestOf(tar) },
      { name: `${digestOf(config)}.config` },
      { name: digestOf(manifest), kind: 'manifest' },
      { name: digestOf(gz) },
    ])
  })

  it('queues background compressed variants, and the layer again (its note grew)', async () => {
    const { cache, tier, cacheDir } = await setup('compress')
    const dest = await cache.newImageDestination()
    await dest.putBlob(Readable.from([tar]), { ...info(tar), mediaType: MediaType.ociLayer })
    await dest.close()
    const variant = (await readdir(cacheDir)).find((n) => n !== digestOf(tar) && !n.includes('.'))!
    expect(gunzipSync(await readFile(join(cacheDir, variant)))).toEqual(tar)
    expect(tier.names).toEqual([digestOf(tar), variant, digestOf(tar)])
  })

  it('tryReusingBlob: a blob the cache lacks is fetched from the tier into the destination and queued', async () => {
    const { cache, tier, cacheDir } = await setup()
    const digest = tier.add(gz)
    const dest = await cache.newImageDestination()
    const reused = await dest.tryReusingBlob(info(gz))
    expect(reused).toMatchObject({ digest, size: gz.length })
    expect(await readFile(join(cacheDir, digest))).toEqual(gz)
    expect(tier.names).toEqual([digest])
    expect(cache.stats).toMatchObject({ hits: 1, shared: { hits: 1 } })
    expect(await dest.tryReusingBlob(info(Buffer.from('nowhere')))).toBeUndefined()
    await dest.close()
  })
})
