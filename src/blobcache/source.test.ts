import { mkdir, readdir, rm, symlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { format } from 'node:util'
import debug from 'debug'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { writeRandomImage } from '../../test/helpers/random-image.js'
import { type Digest, digestOf } from '../digest.js'
import { DirReference } from '../transports/dir.js'
import { BlobCache } from './reference.js'

/** A one-layer gzip image in dir:, and an empty cache directory beside it. */
async function setup(mode: 'preserve' | 'compress' | 'decompress' = 'preserve') {
  const root = await testDir()
  const ref = new DirReference(join(root, 'image'))
  const image = await writeRandomImage(ref, { layers: 1, compression: 'gzip' })
  const cacheDir = join(root, 'cache')
  await mkdir(cacheDir)
  const cache = new BlobCache(ref, cacheDir, mode)
  return { root, ref, image, cacheDir, cache, layer: image.layers[0] }
}

async function collect(gen: AsyncIterable<Readable>): Promise<string[]> {
  const out: string[] = []
  for await (const s of gen) out.push((await readAll(s)).toString())
  return out
}

describe('BlobCacheSource.getManifest', () => {
  it('serves an instance manifest from the cache (hit) and the top-level one from the source (miss)', async () => {
    const { cache, cacheDir, image } = await setup()
    await writeFile(join(cacheDir, image.manifestDigest), image.manifest)
    const src = await cache.newImageSource()
    const cached = await src.getManifest(image.manifestDigest)
    expect(cached.bytes).toEqual(image.manifest)
    expect(cached.mediaType).toBe(image.mediaType)
    expect(cache.stats).toEqual({ hits: 1, misses: 0, errors: 0 })
    expect((await src.getManifest()).bytes).toEqual(image.manifest)
    expect(cache.stats).toEqual({ hits: 1, misses: 1, errors: 0 })
  })

  it('does not serve a cached manifest that does not hash to its name; removes it', async () => {
    const { cache, cacheDir, image } = await setup()
    await writeFile(join(cacheDir, image.manifestDigest), '{"schemaVersion":2,"tampered":true}')
    const src = await cache.newImageSource()
    await expect(src.getManifest(image.manifestDigest)).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    expect(await readdir(cacheDir)).toEqual([])
    expect(cache.stats).toEqual({ hits: 0, misses: 1, errors: 1 })
  })
})

describe('BlobCacheSource.getBlob', () => {
  it('serves a cached blob even when the source lost it, and counts hits and misses', async () => {
    const { cache, cacheDir, ref, image, layer } = await setup()
    const blob = image.blobs.get(layer.digest)!
    await writeFile(join(cacheDir, layer.digest), blob)
    await rm(ref.blobPath(layer.digest))
    const src = await cache.newImageSource()
    const { stream, size } = await src.getBlob({ digest: layer.digest, size: layer.size })
    expect(size).toBe(layer.size)
    expect(await readAll(stream)).toEqual(blob)
    const config = await src.getBlob({ digest: image.configDigest, size: -1 })
    expect(await readAll(config.stream)).toEqual(image.config)
    expect(cache.stats).toEqual({ hits: 1, misses: 1, errors: 0 })
    await src.close()
  })

  it('treats a wrong-size entry as a miss, removes it, and reads the source', async () => {
    const { cache, cacheDir, image, layer } = await setup()
    const blob = image.blobs.get(layer.digest)!
    await writeFile(join(cacheDir, layer.digest), blob.subarray(0, 10)) // truncated
    const src = await cache.newImageSource()
    expect(await readAll((await src.getBlob({ digest: layer.digest, size: layer.size })).stream)).toEqual(blob)
    expect(await readdir(cacheDir)).toEqual([])
    expect(cache.stats).toMatchObject({ hits: 0, misses: 1 })
  })

  it('never passes a corrupt same-size entry off as the blob: the stream fails and the entry goes', async () => {
    const { cache, cacheDir, image, layer } = await setup()
    const corrupt = Buffer.from(image.blobs.get(layer.digest)!)
    corrupt[corrupt.length - 1] ^= 1
    await writeFile(join(cacheDir, layer.digest), corrupt)
    const src = await cache.newImageSource()
    const { stream } = await src.getBlob({ digest: layer.digest, size: -1 })
    await expect(readAll(stream)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await new Promise((r) => setTimeout(r, 10))
    expect(await readdir(cacheDir)).toEqual([])
    expect(cache.stats.errors).toBe(1)
    expect(await readAll((await src.getBlob({ digest: layer.digest, size: -1 })).stream)).toEqual(image.blobs.get(layer.digest))
  })

  it('never follows a symbolic link out of the cache directory', async () => {
    const { cache, cacheDir, root, image } = await setup()
    await writeFile(join(root, 'outside'), image.config)
    await symlink(join(root, 'outside'), join(cacheDir, `${image.configDigest}.config`))
    expect(await cache.hasBlob({ digest: image.configDigest, size: -1 })).toEqual({ present: false })
    const src = await cache.newImageSource()
    expect(await src.getVerifiedBlobPath!({ digest: image.configDigest, size: -1 })).toBeUndefined()
    await readAll((await src.getBlob({ digest: image.configDigest, size: -1 })).stream)
    expect(cache.stats).toMatchObject({ hits: 0, misses: 1 })
  })

  it('falls back to the source when a cache entry cannot be opened', async () => {
    const { cache, cacheDir, image } = await setup()
    await mkdir(join(cacheDir, image.configDigest)) // a directory, not a file
    const src = await cache.newImageSource()
    expect(await readAll((await src.getBlob({ digest: image.configDigest, size: -1 })).stream)).toEqual(image.config)
  })
})

describe('BlobCacheSource.getVerifiedBlobPath and getBlobAt', () => {
  it('returns the cached file on a hit and the source answer (none for dir:) on a miss', async () => {
    const { cache, cacheDir, image, layer } = await setup()
    await writeFile(join(cacheDir, `${image.configDigest}.config`), image.config)
    const src = await cache.newImageSource()
    expect(await src.getVerifiedBlobPath!({ digest: image.configDigest, size: image.config.length })).toBe(
      join(cacheDir, `${image.configDigest}.config`),
    )
    expect(await src.getVerifiedBlobPath!({ digest: layer.digest, size: layer.size })).toBeUndefined()
    // a getBlob that follows the path lookup is not counted twice
    await readAll((await src.getBlob({ digest: image.configDigest, size: -1 })).stream)
    expect(cache.stats.hits).toBe(1)
  })

  it('serves ranges of a cached blob, and of a missed one from a source without getBlobAt', async () => {
    const { cache, cacheDir } = await setup()
    const data = Buffer.from('123456789')
    const digest = digestOf(data)
    await writeFile(join(cacheDir, digest), data)
    const src = await cache.newImageSource()
    expect(await collect(src.getBlobAt!({ digest, size: 9 }, [{ offset: 1, length: 2 }, { offset: 4, length: 1 }]))).toEqual(['23', '5'])
    const store = new MemoryStore()
    const other = Buffer.from('abcdefghi')
    store.blobs.set(digestOf(other), other)
    store.images.set('img', { manifest: { bytes: Buffer.from('{}'), mediaType: '' }, instances: new Map(), signatures: new Map() })
    const memCache = new BlobCache(memoryTransport(store).parseReference('img'), cacheDir)
    const memSrc = await memCache.newImageSource()
    const chunks = [{ offset: 2, length: 3 }, { offset: 0, length: 1 }, { offset: 7, length: -1 }]
    expect(await collect(memSrc.getBlobAt!({ digest: digestOf(other), size: -1 }, chunks))).toEqual(['cde', 'a', 'hi'])
  })
})

describe('BlobCacheSource: the rest', () => {
  it('forwards signatures and logs its counts on close', async () => {
    const { cache, ref } = await setup()
    await writeFile(ref.signaturePath(1), 'sig')
    const src = await cache.newImageSource()
    expect((await src.getSignatures()).map(String)).toEqual(['sig'])
    const lines: string[] = []
    const saved = debug.log
    const namespaces = debug.disable()
    debug.enable([namespaces, 'blobcache:blobcache:source'].filter(Boolean).join(','))
    debug.log = (...args: unknown[]) => void lines.push(format(...args))
    try {
      await src.getBlob({ digest: digestOf('missing') as Digest, size: -1 }).catch(() => {})
      await src.close()
    } finally {
      debug.log = saved
      debug.disable()
      if (namespaces) debug.enable(namespaces)
    }
    expect(lines.some((l) => l.includes(`closed dir:${ref.path}: 0 hits, 1 misses, 0 errors`))).toBe(true)
  })

  it('keeps the source reference name', async () => {
    const { cache, ref } = await setup()
    const src = await cache.newImageSource()
    expect(src.reference).toBe(cache)
    expect(src.reference.stringWithinTransport()).toBe(ref.path)
  })
})
