import { mkdir, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { digestOf } from '../digest.js'
import { imageName } from '../transports/index.js'
import { DirReference } from '../transports/dir.js'
import type { LayerCompression } from '../types.js'
import { BlobCacheDestination } from './destination.js'
import { BlobCache, cacheLookupReferenceFunc } from './reference.js'
import { BlobCacheSource } from './source.js'

describe('BlobCache', () => {
  it('is named after the wrapped reference and forwards its methods', async () => {
    const store = new MemoryStore()
    store.images.set('img', { manifest: { bytes: Buffer.from('{}'), mediaType: '' }, instances: new Map(), signatures: new Map() })
    const ref = memoryTransport(store).parseReference('img')
    const cache = new BlobCache(ref, '/var/cache/x')
    expect(cache.transport).toBe(ref.transport)
    expect(cache.stringWithinTransport()).toBe('img')
    expect(cache.dockerReference()).toBeUndefined()
    expect(imageName(cache)).toBe(imageName(ref))
    expect(cache.directory).toBe('/var/cache/x')
    expect(cache.compress).toBe('preserve')
    expect(cache.compressAlgorithm).toBe('gzip')
    expect(cache.inner).toBe(ref)
    await cache.deleteImage()
    expect(store.images.has('img')).toBe(false)
  })

  it('rejects an empty directory and unknown modes with CACHE_INVALID', () => {
    const ref = new DirReference('/tmp/x')
    expect(() => new BlobCache(ref, '')).toThrow(expect.objectContaining({
      code: 'CACHE_INVALID', message: 'error creating cache around reference "dir:/tmp/x": no directory specified',
    }))
    expect(() => new BlobCache(ref, '/d', 'squash' as LayerCompression)).toThrow(expect.objectContaining({ code: 'CACHE_INVALID' }))
    expect(() => new BlobCache(ref, '/d', 'compress', { compressAlgorithm: 'lz4' as 'gzip' })).toThrow(
      expect.objectContaining({ code: 'CACHE_INVALID' }),
    )
  })

  it('hasBlob looks at <digest> then <digest>.config; size -1 matches any; a wrong size is absent', async () => {
    const dir = await testDir()
    const blob = Buffer.from('blob')
    const config = Buffer.from('{"config":1}')
    await writeFile(join(dir, digestOf(blob)), blob)
    await writeFile(join(dir, `${digestOf(config)}.config`), config)
    const cache = new BlobCache(new DirReference('/tmp/x'), dir)
    expect(await cache.hasBlob({ digest: digestOf(blob), size: -1 })).toEqual({ present: true, size: 4 })
    expect(await cache.hasBlob({ digest: digestOf(config), size: config.length })).toEqual({ present: true, size: config.length })
    expect(await cache.hasBlob({ digest: digestOf('x'), size: -1 })).toEqual({ present: false })
    expect(await cache.hasBlob({ size: -1 })).toEqual({ present: false })
    expect(await cache.hasBlob({ digest: digestOf(blob), size: 5 })).toEqual({ present: false })
    await expect(cache.hasBlob({ digest: 'md5:abc' as never, size: -1 })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
  })

  it('clearCache empties the directory and keeps it; fails CACHE_INVALID when it is missing', async () => {
    const dir = await testDir()
    await writeFile(join(dir, 'foreign'), 'x')
    await mkdir(join(dir, 'sub'))
    const cache = new BlobCache(new DirReference('/tmp/x'), dir)
    await cache.clearCache()
    expect(await readdir(dir)).toEqual([])
    await expect(new BlobCache(new DirReference('/tmp/x'), join(dir, 'nope')).clearCache()).rejects.toMatchObject({ code: 'CACHE_INVALID' })
  })

  it('cacheLookupReferenceFunc wraps references and checks its arguments at once', () => {
    const wrap = cacheLookupReferenceFunc('/d', 'compress', { compressAlgorithm: 'zstd' })
    const cache = wrap(new DirReference('/tmp/x'))
    expect(cache).toBeInstanceOf(BlobCache)
    expect(cache.compress).toBe('compress')
    expect(cache.compressAlgorithm).toBe('zstd')
    expect(() => cacheLookupReferenceFunc('', 'preserve')).toThrow(expect.objectContaining({ code: 'CACHE_INVALID' }))
    expect(() => cacheLookupReferenceFunc('/d', 'squash' as LayerCompression)).toThrow(expect.objectContaining({ code: 'CACHE_INVALID' }))
    // "checked at once": a bad algorithm fails here, not at the first reference wrapped
    expect(() => cacheLookupReferenceFunc('/d', 'compress', { compressAlgorithm: 'lz4' as 'gzip' })).toThrow(
      expect.objectContaining({ code: 'CACHE_INVALID' }),
    )
  })

  it('opens sources and destinations of the wrapped reference through the cache', async () => {
    const root = await testDir()
    const ref = new DirReference(join(root, 'image'))
    const cache = new BlobCache(ref, join(root, 'cache'))
    const dest = await cache.newImageDestination()
    expect(dest).toBeInstanceOf(BlobCacheDestination)
    expect((dest as BlobCacheDestination).inner.reference).toMatchObject({ path: ref.path })
    await dest.putManifest(Buffer.from('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}'))
    await dest.commit()
    await dest.close()
    const src = await cache.newImageSource()
    expect(src).toBeInstanceOf(BlobCacheSource)
    expect(src.reference).toBe(cache)
    await src.close()
  })

  it('runs background tasks a few at a time', async () => {
    const cache = new BlobCache(new DirReference('/tmp/x'), '/d')
    let running = 0
    let max = 0
    const task = async () => {
      running++
      max = Math.max(max, running)
      await new Promise((r) => setTimeout(r, 5))
      running--
    }
    await Promise.all(Array.from({ length: 6 }, () => cache.runInBackground(task)))
    expect(max).toBe(2)
  })
})
