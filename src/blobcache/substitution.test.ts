import { rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { type Digest, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import type { BlobInfo } from '../types.js'
import { BlobCache } from './reference.js'
import type { SharedEntry } from './shared/format.js'
import { CHUNKED_ANNOTATIONS, type SubstitutionView, substituteLayer, tieredView } from './substitution.js'

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

/** A view over plain maps: notes and sizes as a tier (or anything) would report them. */
function fakeView(notes: { compressed?: Record<string, [Digest, string][]>; decompressed?: Record<string, Digest>; sizes?: Record<string, number> }): SubstitutionView {
  return {
    async *compressedVariants(d) {
      yield* notes.compressed?.[d] ?? []
    },
    decompressedOf: async (d) => notes.decompressed?.[d],
    sizeOf: async (d) => notes.sizes?.[d],
  }
}

describe('substituteLayer through a view', () => {
  it('compress: takes the first variant of the algorithm the view offers whose notes agree both ways', async () => {
    const other = digestOf('other gzip')
    const view = fakeView({
      compressed: { [U]: [[other, 'gzip'], [G, 'gzip'], [Z, 'zstd']] },
      decompressed: { [other]: digestOf('something else'), [G]: U, [Z]: U },
      sizes: { [other]: 5, [G]: 1234, [Z]: 99 },
    })
    expect(await substituteLayer(view, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toEqual({
      digest: G, size: 1234, mediaType: MediaType.ociLayerGzip, compressionOperation: 'compress', compressionAlgorithm: 'gzip',
    })
    // a variant of unknown size (neither cached nor in the tier) is passed over
    const sizeless = fakeView({ compressed: { [U]: [[G, 'gzip']] }, decompressed: { [G]: U } })
    expect(await substituteLayer(sizeless, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toBeUndefined()
  })

  it('decompress: the diff ID rule and the both-way rule hold for notes from a view', async () => {
    const view = fakeView({ compressed: { [U]: [[G, 'gzip']] }, decompressed: { [G]: U, [Z]: U }, sizes: { [U]: 77 } })
    const gl = layer(G, MediaType.ociLayerGzip)
    expect(await substituteLayer(view, gl, 'decompress', 'gzip')).toMatchObject({ digest: U, size: 77, compressionOperation: 'decompress' })
    expect(await substituteLayer(view, gl, 'decompress', 'gzip', U)).toMatchObject({ digest: U })
    expect(await substituteLayer(view, gl, 'decompress', 'gzip', digestOf('another diff id'))).toBeUndefined()
    // Z says it decompresses to U, but U does not list Z: no agreement, no substitute
    expect(await substituteLayer(view, layer(Z, MediaType.ociLayerZstd), 'decompress', 'gzip')).toBeUndefined()
  })
})

describe('tieredView', () => {
  /** A stand-in for SharedTier.lookup over fixed entries, counting the digests asked for. */
  function fakeTier(entries: SharedEntry[]) {
    const asked: Digest[] = []
    const byDigest = new Map(entries.map((e) => [e.digest, e]))
    return { asked, lookup: async (d: Digest) => (asked.push(d), byDigest.get(d)) }
  }
  const entry = (digest: Digest, size: number, extra: Partial<SharedEntry> = {}): SharedEntry => ({
    digest, size, kind: 'layer', compressed: new Map(), ...extra,
  })

  it('answers from the directory first and asks the tier only for what it lacks', async () => {
    const dir = await cacheDir()
    const tier = fakeTier([entry(U, 5, { compressed: new Map([[G, 'gzip']]) })])
    const view = tieredView(dir, tier)
    expect(await substituteLayer(view, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toMatchObject({ digest: G, size: g.length })
    expect(tier.asked).toEqual([])
    expect(await view.sizeOf(U)).toBe(u.length)
    expect(tier.asked).toEqual([])
  })

  it('substitutes a variant only the tier knows, sized by its own tier entry, after the local ones', async () => {
    const dir = await testDir()
    await writeFile(join(dir, U), u)
    const T = digestOf('gzip bytes made elsewhere')
    const tier = fakeTier([
      entry(U, u.length, { compressed: new Map([[T, 'gzip'], [Z, 'zstd']]) }),
      entry(T, 4321, { compression: 'gzip', decompressed: U }),
    ])
    const view = tieredView(dir, tier)
    expect(await substituteLayer(view, layer(U, MediaType.ociLayer), 'compress', 'gzip')).toEqual({
      digest: T, size: 4321, mediaType: MediaType.ociLayerGzip, compressionOperation: 'compress', compressionAlgorithm: 'gzip',
    })
    // Z is listed by U's entry but has no entry of its own: the tier cannot supply it
    expect(await substituteLayer(view, layer(U, MediaType.ociLayer), 'compress', 'zstd')).toBeUndefined()
    // a local variant comes before the tier's
    await writeFile(join(dir, G), g)
    await writeFile(join(dir, `${U}.compressed`), G)
    await writeFile(join(dir, `${G}.decompressed`), U)
    const variants: string[] = []
    for await (const [d] of view.compressedVariants(U)) variants.push(d)
    expect(variants).toEqual([G, T, Z])
  })

  it('decompress: a compressed layer whose decompressed form is only in the tier', async () => {
    const dir = await testDir()
    const tier = fakeTier([
      entry(G, g.length, { compression: 'gzip', decompressed: U }),
      entry(U, 600, { compressed: new Map([[G, 'gzip']]) }),
    ])
    const view = tieredView(dir, tier)
    expect(await substituteLayer(view, layer(G, MediaType.ociLayerGzip), 'decompress', 'gzip')).toMatchObject({ digest: U, size: 600 })
    expect(await substituteLayer(view, layer(G, MediaType.ociLayerGzip), 'decompress', 'gzip', digestOf('x'))).toBeUndefined()
    // the local note wins over the tier's: a local .decompressed naming something else is not overridden
    await writeFile(join(dir, `${G}.decompressed`), Z)
    expect(await substituteLayer(view, layer(G, MediaType.ociLayerGzip), 'decompress', 'gzip')).toBeUndefined()
    await rm(join(dir, `${G}.decompressed`))
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
