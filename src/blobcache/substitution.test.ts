import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import type { BlobInfo } from '../types.js'
import { BlobCache } from './reference.js'
import { CHUNKED_ANNOTATIONS, substituteLayer } from './substitution.js'

const u = Buffer.from('uncompressed tar')
const g = Buffer.from('gzip bytes')
const z = Buffer.from('zstd bytes')
const [U, G, Z] = [digestOf(u), digestOf(g), digestOf(z)]

/** A cache holding U, its gzip and zstd variants and the notes linking them. */
async function cacheDir(note = `${G} gzip\n${Z} zstd`): Promise<string> {
  const dir = await testDir()
  await writeFile(join(dir, U), u)
  await writeFile(join(dir, G), g)
  await writeFile(join(dir, Z), z)
  await writeFile(join(dir, `${U}.compressed`), note)
  await writeFile(join(dir, `${G}.decompressed`), U)
  await writeFile(join(dir, `${Z}.decompressed`), U)
  return dir
}

const layer = (digest: typeof U, mediaType: string, extra: Partial<BlobInfo> = {}): BlobInfo => ({ digest, size: 99, mediaType, ...extra })

describe('substituteLayer', () => {
  it('compress: picks the variant of the requested algorithm, with matching media type and size', async () => {
    const dir = await cacheDir()
    expect(await substituteLayer(dir, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toEqual({
      digest: G, size: g.length, mediaType: MediaType.ociLayerGzip, compressionOperation: 'compress', compressionAlgorithm: 'gzip',
    })
    expect(await substituteLayer(dir, layer(U, MediaType.ociLayer), 'compress', 'zstd')).toMatchObject({
      digest: Z, mediaType: MediaType.ociLayerZstd, compressionAlgorithm: 'zstd',
    })
  })

  it('compress: Docker layers become diff.tar.gzip and never zstd', async () => {
    const dir = await cacheDir()
    expect(await substituteLayer(dir, layer(U, MediaType.dockerLayer), 'compress', 'gzip')).toMatchObject({
      digest: G, mediaType: MediaType.dockerLayerGzip,
    })
    expect(await substituteLayer(dir, layer(U, MediaType.dockerLayer), 'compress', 'zstd')).toBeUndefined()
  })

  it('compress: a legacy one-line note means gzip; a variant whose file is gone is skipped', async () => {
    const dir = await cacheDir(G)
    expect(await substituteLayer(dir, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toMatchObject({ digest: G })
    expect(await substituteLayer(dir, layer(U, MediaType.ociLayer), 'compress', 'zstd')).toBeUndefined()
    const gone = await cacheDir(`${digestOf('gone')} gzip`)
    expect(await substituteLayer(gone, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toBeUndefined()
  })

  it('decompress: OCI layers become tar without zstd:chunked annotations; Docker layers are kept', async () => {
    const dir = await cacheDir()
    const annotations = Object.fromEntries([...CHUNKED_ANNOTATIONS.map((k) => [k, 'x']), ['keep', 'me']])
    const zl = layer(Z, MediaType.ociLayerZstd, { annotations, compressionAlgorithm: 'zstd' })
    expect(await substituteLayer(dir, zl, 'decompress', 'gzip')).toEqual({
      digest: U, size: u.length, mediaType: MediaType.ociLayer, compressionOperation: 'decompress', annotations: { keep: 'me' },
    })
    expect(await substituteLayer(dir, layer(G, MediaType.dockerLayerGzip), 'decompress', 'gzip')).toBeUndefined()
  })

  it('keeps unknown media types, preserve mode and layers without notes', async () => {
    const dir = await cacheDir()
    expect(await substituteLayer(dir, layer(G, 'application/x-foreign'), 'decompress', 'gzip')).toBeUndefined()
    expect(await substituteLayer(dir, layer(G, MediaType.ociLayerNondistributableGzip), 'decompress', 'gzip')).toBeUndefined()
    expect(await substituteLayer(dir, layer(U, MediaType.ociLayer), 'preserve', 'gzip')).toBeUndefined()
    expect(await substituteLayer(dir, layer(digestOf('other'), MediaType.ociLayer), 'compress', 'gzip')).toBeUndefined()
  })
})

describe('BlobCacheSource.layerInfosForCopy', () => {
  function image(store: MemoryStore, signed: boolean, mediaType: string = MediaType.ociManifest) {
    const layerType = mediaType === MediaType.ociManifest ? MediaType.ociLayer : MediaType.dockerLayer
    const manifest = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType,
      config: { mediaType: MediaType.ociConfig, digest: digestOf('{}'), size: 2 },
      layers: [{ mediaType: layerType, digest: U, size: u.length }],
    }))
    store.images.set('img', {
      manifest: { bytes: manifest, mediaType }, instances: new Map(),
      signatures: new Map(signed ? [['', [Buffer.from('sig')]]] : []),
    })
  }

  it('substitutes from the manifest, and never for a signed image', async () => {
    const dir = await cacheDir()
    const store = new MemoryStore()
    image(store, false)
    const ref = memoryTransport(store).parseReference('img')
    const src = await new BlobCache(ref, dir, 'compress').newImageSource()
    expect(await src.layerInfosForCopy!()).toMatchObject([{ digest: G, mediaType: MediaType.ociLayerGzip }])
    image(store, true)
    const signed = await new BlobCache(ref, dir, 'compress').newImageSource()
    expect(await signed.layerInfosForCopy!()).toBeUndefined()
    expect(await (await new BlobCache(ref, dir, 'preserve').newImageSource()).layerInfosForCopy!()).toBeUndefined()
  })

  it('builds on the inner source layerInfosForCopy when it has one', async () => {
    const dir = await cacheDir()
    const store = new MemoryStore()
    image(store, false)
    const inner: BlobInfo[] = [{ digest: U, size: u.length, mediaType: MediaType.ociLayer, annotations: { a: 'b' } }]
    const ref = memoryTransport(store, { layerInfosForCopy: () => inner }).parseReference('img')
    const src = await new BlobCache(ref, dir, 'compress', { compressAlgorithm: 'zstd' }).newImageSource()
    expect(await src.layerInfosForCopy!()).toEqual([
      { digest: Z, size: z.length, mediaType: MediaType.ociLayerZstd, annotations: { a: 'b' }, compressionOperation: 'compress', compressionAlgorithm: 'zstd' },
    ])
  })
})
