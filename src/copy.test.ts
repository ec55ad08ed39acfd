import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { type MemoryStore as Store, MemoryStore, memoryTransport } from '../test/helpers/memory-transport.js'
import { buildRandomImage, putRandomImage, writeRandomImage, writeRandomIndex } from '../test/helpers/random-image.js'
import { decompressStream, detectCompression } from './compression.js'
import { compressionStep } from './copy-blob.js'
import { type CopyProgressEvent, copyImage } from './copy.js'
import { digestOf } from './digest.js'
import { type ImageManifest, type ImageIndex, type Platform, currentPlatform, layerCompressionOf } from './manifest.js'
import { MediaType } from './media-types.js'
import type { BlobInfo } from './types.js'
import { overrideSource } from '../test/helpers/conformance.js'

async function decompress(data: Buffer): Promise<Buffer> {
  const alg = detectCompression(data)
  if (!alg) return data
  const chunks: Buffer[] = []
  await pipeline(Readable.from([data]), decompressStream(alg), new Writable({ write(c: Buffer, _e, cb) { chunks.push(c); cb() } }))
  return Buffer.concat(chunks)
}

function stored(store: Store, name: string): { manifest: Buffer; parsed: ImageManifest & ImageIndex } {
  const image = store.images.get(name)
  if (!image) throw new Error(`no image ${name}`)
  return { manifest: image.manifest.bytes, parsed: JSON.parse(image.manifest.bytes.toString()) }
}

/** Checks every layer of a stored manifest: digest, size, media type matching the bytes, diff_id. */
async function checkLayers(store: Store, manifestBytes: Buffer): Promise<(string | null)[]> {
  const m = JSON.parse(manifestBytes.toString()) as ImageManifest
  const config = JSON.parse(store.blobs.get(m.config.digest)!.toString()) as { rootfs: { diff_ids: string[] } }
  const algs: (string | null)[] = []
  for (const [i, l] of m.layers.entries()) {
    const data = store.blobs.get(l.digest)!
    expect(data, `layer ${l.digest}`).toBeDefined()
    expect(digestOf(data)).toBe(l.digest)
    expect(data.length).toBe(l.size)
    expect(detectCompression(data)).toBe(layerCompressionOf(l.mediaType))
    expect(digestOf(await decompress(data))).toBe(config.rootfs.diff_ids[i])
    algs.push(detectCompression(data))
  }
  return algs
}

function setup(opts: Parameters<typeof memoryTransport>[1] = {}) {
  const store = new MemoryStore()
  return { store, mem: memoryTransport(store), dst: memoryTransport(store, opts) }
}

describe('copyImage (memory transport)', () => {
  it('copies an image byte for byte and reports events', async () => {
    const { store, mem } = setup()
    const image = await writeRandomImage(mem.parseReference('src'), { layers: 3 })
    const events: CopyProgressEvent[] = []
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'), { onProgress: (e) => events.push(e), concurrency: 2 })
    expect(r.digest).toBe(image.manifestDigest)
    expect(r.manifest.equals(image.manifest)).toBe(true)
    expect(r.mediaType).toBe(MediaType.ociManifest)
    expect(stored(store, 'dst').manifest.equals(image.manifest)).toBe(true)
    // every blob is already in the shared store, so all are reused
    expect(r).toMatchObject({ copied: 0, reused: 4 })
    expect(events.filter((e) => e.type === 'reused')).toHaveLength(4)
  })

  it('copies blobs when the destination has none, with start/progress/done events', async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const to = memoryTransport(new MemoryStore())
    const image = await writeRandomImage(from.parseReference('src'), { layers: 2, layerSize: 3 << 20, compression: null })
    const events: CopyProgressEvent[] = []
    const r = await copyImage(from.parseReference('src'), to.parseReference('dst'), { onProgress: (e) => events.push(e) })
    expect(r).toMatchObject({ digest: image.manifestDigest, copied: 3, reused: 0 })
    expect(r.bytes).toBe(image.layers.reduce((n, l) => n + l.size, 0) + image.config.length)
    for (const l of image.layers) {
      const mine = events.filter((e) => e.digest === l.digest)
      expect(mine[0].type).toBe('start')
      expect(mine.at(-1)).toMatchObject({ type: 'done', bytes: l.size, kind: 'layer' })
      expect(mine.at(-1)!.newDigest).toBeUndefined()
      expect(mine.filter((e) => e.type === 'progress').at(-1)!.bytes).toBe(l.size)
    }
    expect(events.find((e) => e.kind === 'config' && e.type === 'done')).toMatchObject({ digest: image.configDigest })
  })

  it('selects one platform from an index', async () => {
    const { store, mem } = setup()
    const ix = await writeRandomIndex(mem.parseReference('src'), [
      { os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }, { os: 'linux', architecture: 'arm', variant: 'v7' },
    ])
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'), { platform: { os: 'linux', architecture: 'arm64' } })
    expect(r.digest).toBe(ix.images[1].manifestDigest)
    expect(stored(store, 'dst').manifest.equals(ix.images[1].manifest)).toBe(true)
    expect(store.images.get('dst')!.instances.size).toBe(0)
    await expect(copyImage(mem.parseReference('src'), mem.parseReference('x'), { platform: { os: 'windows', architecture: 'amd64' } }))
      .rejects.toMatchObject({ code: 'PLATFORM_UNKNOWN' })
  })

  it('copies the instance of the running platform when no platform is given', async () => {
    const { store, mem } = setup()
    const here = currentPlatform()
    const others: Platform[] = [
      { os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }, { os: 'linux', architecture: 's390x' },
      { os: 'linux', architecture: 'ppc64le' }, { os: 'windows', architecture: 'amd64' },
    ].filter((p) => p.os !== here.os || p.architecture !== here.architecture)
    // the running platform sits in the middle, so neither "first" nor "last" picks it by chance
    const platforms = [...others.slice(0, 2), here, ...others.slice(2)]
    const ix = await writeRandomIndex(mem.parseReference('src'), platforms)
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'))
    expect(r.digest).toBe(ix.images[2].manifestDigest)
    expect(stored(store, 'dst').manifest.equals(ix.images[2].manifest)).toBe(true)
    // and an index without the running platform fails PLATFORM_UNKNOWN rather than picking another
    await writeRandomIndex(mem.parseReference('foreign'), [{ os: 'plan9', architecture: 'mips' }])
    await expect(copyImage(mem.parseReference('foreign'), mem.parseReference('x'))).rejects.toMatchObject({ code: 'PLATFORM_UNKNOWN' })
  })

  it("copies every instance with imageListSelection 'all'", async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const toStore = new MemoryStore()
    const to = memoryTransport(toStore)
    const ix = await writeRandomIndex(from.parseReference('src'), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
    const r = await copyImage(from.parseReference('src'), to.parseReference('dst'), { imageListSelection: 'all' })
    expect(r).toMatchObject({ digest: ix.indexDigest, mediaType: MediaType.ociIndex, copied: 6 })
    const dst = toStore.images.get('dst')!
    expect(dst.manifest.bytes.equals(ix.index)).toBe(true)
    for (const im of ix.images) expect(dst.instances.get(im.manifestDigest)!.equals(im.manifest)).toBe(true)
    const noLists = memoryTransport(new MemoryStore(), { acceptsImageLists: false })
    await expect(copyImage(from.parseReference('src'), noLists.parseReference('dst'), { imageListSelection: 'all' }))
      .rejects.toMatchObject({ code: 'UNSUPPORTED' })
  })

  it("rewrites the index when instances change with 'all'", async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const to = memoryTransport(store)
    const ix = await writeRandomIndex(from.parseReference('src'), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], { compression: null })
    const r = await copyImage(from.parseReference('src'), to.parseReference('dst'), { imageListSelection: 'all', compression: 'compress' })
    const index = JSON.parse(r.manifest.toString()) as ImageIndex
    expect(r.digest).toBe(digestOf(r.manifest))
    expect(r.digest).not.toBe(ix.indexDigest)
    const dst = store.images.get('dst')!
    for (const [i, d] of index.manifests.entries()) {
      expect(d.platform).toEqual(ix.images[i].platform)
      const bytes = dst.instances.get(d.digest)!
      expect(bytes.length).toBe(d.size)
      expect(await checkLayers(store, bytes)).toEqual(['gzip', 'gzip'])
    }
  })

  it("copies nested lists and entries it cannot interpret as they are with 'all'", async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const ix = await writeRandomIndex(mem.parseReference('inner'), [{ os: 'linux', architecture: 'amd64' }], { compression: null })
    const inner = store.images.get('inner')!
    const odd = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.example.thing.v1+json', payload: 'x' }))
    const outer: ImageIndex = {
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        { mediaType: MediaType.ociIndex, digest: ix.indexDigest, size: ix.index.length },
        { mediaType: 'application/vnd.example.thing.v1+json', digest: digestOf(odd), size: odd.length },
      ],
    }
    const outerBytes = Buffer.from(JSON.stringify(outer))
    store.images.set('src', {
      manifest: { bytes: outerBytes, mediaType: MediaType.ociIndex },
      instances: new Map([...inner.instances, [ix.indexDigest, ix.index], [digestOf(odd), odd]]),
      signatures: new Map(),
    })
    const same = await copyImage(mem.parseReference('src'), mem.parseReference('same'), { imageListSelection: 'all' })
    expect(same.digest).toBe(digestOf(outerBytes))
    const dst = store.images.get('same')!
    expect(dst.instances.get(digestOf(odd))!.equals(odd)).toBe(true)
    expect(dst.instances.get(ix.indexDigest)!.equals(ix.index)).toBe(true)
    expect(dst.instances.get(ix.images[0].manifestDigest)!.equals(ix.images[0].manifest)).toBe(true)

    const gz = await copyImage(mem.parseReference('src'), mem.parseReference('gz'), { imageListSelection: 'all', compression: 'compress' })
    const top = JSON.parse(gz.manifest.toString()) as ImageIndex
    expect(top.manifests[1]).toEqual(outer.manifests[1])
    expect(top.manifests[0].digest).not.toBe(ix.indexDigest)
    const gzStore = store.images.get('gz')!
    const nested = JSON.parse(gzStore.instances.get(top.manifests[0].digest)!.toString()) as ImageIndex
    expect(nested.manifests[0].platform).toEqual({ os: 'linux', architecture: 'amd64' })
    expect(await checkLayers(store, gzStore.instances.get(nested.manifests[0].digest)!)).toEqual(['gzip', 'gzip'])
  })

  it.each([
    { from: null, compression: 'compress', algorithm: undefined, want: 'gzip' },
    { from: null, compression: 'compress', algorithm: 'zstd', want: 'zstd' },
    { from: 'gzip', compression: 'compress', algorithm: 'zstd', want: 'zstd' },
    { from: 'zstd', compression: 'compress', algorithm: 'gzip', want: 'gzip' },
    { from: 'zstd', compression: 'compress', algorithm: undefined, want: 'zstd' },
    { from: 'gzip', compression: 'decompress', algorithm: undefined, want: null },
    { from: 'zstd', compression: 'decompress', algorithm: undefined, want: null },
    { from: 'gzip', compression: 'preserve', algorithm: 'zstd', want: 'gzip' },
  ] as const)('$compression $algorithm: $from layers become $want', async ({ from, compression, algorithm, want }) => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const image = await writeRandomImage(mem.parseReference('src'), { compression: from, layerSize: 200_000 })
    const events: CopyProgressEvent[] = []
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'), {
      compression, compressionAlgorithm: algorithm, onProgress: (e) => events.push(e),
    })
    const m = JSON.parse(r.manifest.toString()) as ImageManifest
    expect(m.config.digest).toBe(image.configDigest)
    expect(await checkLayers(store, r.manifest)).toEqual([want, want])
    const changed = want !== from
    expect(r.digest === image.manifestDigest).toBe(!changed)
    if (changed) {
      const done = events.filter((e) => e.type === 'done' && e.kind === 'layer')
      expect(done.map((e) => e.newDigest).sort()).toEqual(m.layers.map((l) => l.digest).sort())
    }
  })

  it.each([
    { desired: 'compress', from: null, want: 'gzip' },
    { desired: 'decompress', from: 'gzip', want: null },
    { desired: 'decompress', from: 'zstd', want: null },
    { desired: 'preserve', from: 'zstd', want: 'zstd' },
  ] as const)("without a compression option, follows the destination's desire: $desired turns $from layers into $want", async ({ desired, from, want }) => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const image = await writeRandomImage(mem.parseReference('src'), { compression: from, layerSize: 100_000 })
    const wants = memoryTransport(store, { desiredLayerCompression: desired })
    const r = await copyImage(mem.parseReference('src'), wants.parseReference('dst'))
    expect(await checkLayers(store, r.manifest)).toEqual([want, want])
    expect((JSON.parse(r.manifest.toString()) as ImageManifest).config.digest).toBe(image.configDigest)
    expect(r.digest === image.manifestDigest).toBe(want === from)
    // an explicit option wins over the destination's desire
    const kept = await copyImage(mem.parseReference('src'), wants.parseReference('kept'), { compression: 'preserve' })
    expect(kept.digest).toBe(image.manifestDigest)
  })

  it.each([
    [2, 7],
    [undefined, 9],
  ] as const)('copies at most %s blobs at once (default 6), and that many when it can', async (concurrency, layers) => {
    const store = new MemoryStore()
    const slow = memoryTransport(store, { chunkSize: 16 << 10, delayMs: 5 })
    await writeRandomImage(slow.parseReference('src'), { layers, layerSize: 128 << 10, compression: null })
    let open = 0
    let max = 0
    const inner = slow.parseReference('src')
    const counting = overrideSource(inner, (s) => ({
      getBlob: async (info: BlobInfo, o?: { signal?: AbortSignal }) => {
        const blob = await s.getBlob(info, o)
        max = Math.max(max, ++open)
        blob.stream.once('close', () => open--)
        return blob
      },
    }))
    const r = await copyImage(counting, memoryTransport(new MemoryStore()).parseReference('dst'), { concurrency })
    expect(r.copied).toBe(layers + 1)
    expect(max).toBe(concurrency ?? 6)
    expect(open).toBe(0)
  })

  it('prefers the bytes over a lying layer media type', async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const image = await buildRandomImage({ compression: 'gzip', layers: 1 })
    // declare the gzip layer as plain tar, as old blob caches did
    const m = JSON.parse(image.manifest.toString()) as ImageManifest
    m.layers[0].mediaType = MediaType.ociLayer
    const lying = { ...image, manifest: Buffer.from(JSON.stringify(m)), manifestDigest: digestOf(JSON.stringify(m)) }
    const dest = await mem.parseReference('src').newImageDestination()
    await putRandomImage(dest, lying)
    await dest.commit()
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'), { compression: 'compress' })
    const out = JSON.parse(r.manifest.toString()) as ImageManifest
    expect(out.layers[0]).toMatchObject({ digest: image.layers[0].digest, mediaType: MediaType.ociLayerGzip })
    expect(await checkLayers(store, r.manifest)).toEqual(['gzip'])
  })

  it('converts between OCI and Docker schema 2 when forced', async () => {
    const { store, mem } = setup()
    const image = await writeRandomImage(mem.parseReference('src'), { format: 'oci' })
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('v2s2'), { manifestFormat: 'v2s2' })
    const m = JSON.parse(r.manifest.toString()) as ImageManifest
    expect(r.mediaType).toBe(MediaType.dockerManifest)
    expect(m.config).toMatchObject({ mediaType: MediaType.dockerConfig, digest: image.configDigest })
    expect(m.layers.map((l) => [l.mediaType, l.digest])).toEqual(image.layers.map((l) => [MediaType.dockerLayerGzip, l.digest]))
    const back = await copyImage(mem.parseReference('v2s2'), mem.parseReference('oci'), { manifestFormat: 'oci' })
    expect(back.mediaType).toBe(MediaType.ociManifest)
    expect(JSON.parse(back.manifest.toString())).toEqual(JSON.parse(image.manifest.toString()))
    await checkLayers(store, back.manifest)
  })

  it('converts when the destination accepts only Docker schema 2, and switches to OCI for zstd', async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const dockerOnly = memoryTransport(store, { supportedManifestMIMETypes: [MediaType.dockerManifest, MediaType.dockerManifestList] })
    const both = memoryTransport(store, { supportedManifestMIMETypes: [MediaType.dockerManifest, MediaType.ociManifest] })
    await writeRandomImage(mem.parseReference('src'), { format: 'oci' })
    const r = await copyImage(mem.parseReference('src'), dockerOnly.parseReference('dst'))
    expect(r.mediaType).toBe(MediaType.dockerManifest)
    await checkLayers(store, r.manifest)

    await writeRandomImage(mem.parseReference('v2'), { format: 'v2s2', compression: null })
    const z = await copyImage(mem.parseReference('v2'), both.parseReference('z'), { compression: 'compress', compressionAlgorithm: 'zstd' })
    expect(z.mediaType).toBe(MediaType.ociManifest)
    expect(await checkLayers(store, z.manifest)).toEqual(['zstd', 'zstd'])
    await expect(copyImage(mem.parseReference('v2'), dockerOnly.parseReference('z'), { compression: 'compress', compressionAlgorithm: 'zstd' }))
      .rejects.toMatchObject({ code: 'UNSUPPORTED' })
    await expect(copyImage(mem.parseReference('v2'), both.parseReference('z2'), { compression: 'compress', compressionAlgorithm: 'zstd', manifestFormat: 'v2s2' }))
      .rejects.toMatchObject({ code: 'UNSUPPORTED' })
    expect(store.images.has('z2')).toBe(false)
  })

  it('refuses to change digests with preserveDigests, writing nothing', async () => {
    const srcStore = new MemoryStore()
    const mem = memoryTransport(srcStore)
    const dstStore = new MemoryStore()
    const to = memoryTransport(dstStore)
    const image = await writeRandomImage(mem.parseReference('src'), { compression: null })
    await expect(copyImage(mem.parseReference('src'), to.parseReference('dst'), { preserveDigests: true, compression: 'compress' }))
      .rejects.toMatchObject({ code: 'DIGESTS_NOT_PRESERVED', message: expect.stringMatching(/compressed with gzip/) })
    await expect(copyImage(mem.parseReference('src'), to.parseReference('dst'), { preserveDigests: true, manifestFormat: 'v2s2' }))
      .rejects.toMatchObject({ code: 'DIGESTS_NOT_PRESERVED', message: expect.stringMatching(/converted to v2s2/) })
    expect(dstStore.puts).toEqual([])
    expect(dstStore.images.size).toBe(0)
    // a destination that merely desires compression gets the layers as they are
    const wantsGzip = memoryTransport(dstStore, { desiredLayerCompression: 'compress' })
    const r = await copyImage(mem.parseReference('src'), wantsGzip.parseReference('dst'), { preserveDigests: true })
    expect(r.digest).toBe(image.manifestDigest)
  })

  it('rejects bad compression settings before writing anything', async () => {
    const { store, mem } = setup()
    await writeRandomImage(mem.parseReference('src'), { compression: null })
    const puts = store.puts.length
    await expect(copyImage(mem.parseReference('src'), mem.parseReference('dst'), { compression: 'compress', compressionLevel: 99 }))
      .rejects.toMatchObject({ code: 'UNSUPPORTED' })
    await expect(copyImage(mem.parseReference('src'), mem.parseReference('dst'), { compressionAlgorithm: 'xz' as 'gzip' }))
      .rejects.toMatchObject({ code: 'UNSUPPORTED' })
    expect(store.puts.length).toBe(puts)
    expect(store.images.has('dst')).toBe(false)
  })

  it('reuses blobs on a second copy', async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const to = memoryTransport(new MemoryStore())
    await writeRandomImage(from.parseReference('src'))
    const first = await copyImage(from.parseReference('src'), to.parseReference('a'))
    expect(first).toMatchObject({ copied: 3, reused: 0 })
    const events: CopyProgressEvent[] = []
    const second = await copyImage(from.parseReference('src'), to.parseReference('b'), { onProgress: (e) => events.push(e) })
    expect(second).toMatchObject({ copied: 0, reused: 3, bytes: 0, digest: first.digest })
    expect(events.map((e) => e.type)).toEqual(['reused', 'reused', 'reused'])
  })

  it('copies a layer that appears twice only once', async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const toStore = new MemoryStore()
    const image = await buildRandomImage({ layers: 1 })
    const m = JSON.parse(image.manifest.toString()) as ImageManifest
    m.layers.push(m.layers[0])
    const bytes = Buffer.from(JSON.stringify(m))
    const dest = await from.parseReference('src').newImageDestination()
    await putRandomImage(dest, { ...image, manifest: bytes, manifestDigest: digestOf(bytes) })
    await dest.commit()
    const events: CopyProgressEvent[] = []
    const r = await copyImage(from.parseReference('src'), memoryTransport(toStore).parseReference('dst'), { onProgress: (e) => events.push(e) })
    expect(r).toMatchObject({ copied: 2, digest: digestOf(bytes) })
    expect(toStore.puts.filter((d) => d === image.layers[0].digest)).toHaveLength(1)
    expect(events.filter((e) => e.type === 'skipped')).toHaveLength(1)
  })

  it('fails DIGEST_INVALID on wrong source bytes and stores nothing', async () => {
    const store = new MemoryStore()
    const from = memoryTransport(store)
    const toStore = new MemoryStore()
    const image = await writeRandomImage(from.parseReference('src'), { compression: null })
    const bad = Buffer.from(store.blobs.get(image.layers[1].digest)!)
    bad[bad.length - 1] ^= 1
    store.blobs.set(image.layers[1].digest, bad)
    for (const compression of ['preserve', 'compress'] as const) {
      await expect(copyImage(from.parseReference('src'), memoryTransport(toStore).parseReference('dst'), { compression }))
        .rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    }
    expect(toStore.images.size).toBe(0)
    expect(toStore.blobs.size).toBe(0)
  })

  it('rejects with the abort reason mid-copy', async () => {
    const store = new MemoryStore()
    const slow = memoryTransport(store, { chunkSize: 64 << 10, delayMs: 20 })
    await writeRandomImage(slow.parseReference('src'), { layerSize: 2 << 20, compression: null })
    const toStore = new MemoryStore()
    const ac = new AbortController()
    const reason = new Error('stop now')
    const started = Date.now()
    const p = copyImage(slow.parseReference('src'), memoryTransport(toStore).parseReference('dst'), {
      signal: ac.signal,
      onProgress: (e) => { if (e.type === 'progress') ac.abort(reason) },
    })
    await expect(p).rejects.toBe(reason)
    expect(Date.now() - started).toBeLessThan(2000)
    expect(toStore.images.size).toBe(0)
    expect(toStore.blobs.size).toBe(0)
    const already = AbortSignal.abort(reason)
    await expect(copyImage(slow.parseReference('src'), memoryTransport(toStore).parseReference('dst'), { signal: already })).rejects.toBe(reason)
  })

  it('copies signatures, or refuses to lose or invalidate them', async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const image = await writeRandomImage(mem.parseReference('src'), { compression: null })
    const sigs = [Buffer.from('signature one'), Buffer.from('signature two')]
    store.images.get('src')!.signatures.set('', sigs)
    const r = await copyImage(mem.parseReference('src'), mem.parseReference('dst'))
    expect(r.digest).toBe(image.manifestDigest)
    expect(store.images.get('dst')!.signatures.get('')).toEqual(sigs)

    const unsigned = memoryTransport(store, { signatures: false })
    await expect(copyImage(mem.parseReference('src'), unsigned.parseReference('x')))
      .rejects.toMatchObject({ code: 'SIGNATURES_UNSUPPORTED', message: expect.stringMatching(/remove-signatures/) })
    await expect(copyImage(mem.parseReference('src'), mem.parseReference('x'), { compression: 'compress' }))
      .rejects.toMatchObject({ code: 'SIGNATURES_UNSUPPORTED', message: expect.stringMatching(/remove-signatures/) })
    expect(store.images.has('x')).toBe(false)
    // a destination that only desires compression keeps the signed image as it is
    const wantsGzip = memoryTransport(store, { desiredLayerCompression: 'compress' })
    expect((await copyImage(mem.parseReference('src'), wantsGzip.parseReference('y'))).digest).toBe(image.manifestDigest)
    const removed = await copyImage(mem.parseReference('src'), unsigned.parseReference('z'), { removeSignatures: true, compression: 'compress' })
    expect(removed.digest).not.toBe(image.manifestDigest)
    expect(store.images.get('z')!.signatures.size).toBe(0)
  })

  it("uses the source's substituted layers and rewrites the manifest", async () => {
    const store = new MemoryStore()
    const plain = await buildRandomImage({ compression: null, layers: 2, seed: 7 })
    const gz = plain.layers.map((l) => gzipSync(plain.blobs.get(l.digest)!))
    const substitutes: BlobInfo[] = plain.layers.map((l, i) => ({
      digest: digestOf(gz[i]), size: gz[i].length, mediaType: MediaType.ociLayerGzip, compressionOperation: 'compress', compressionAlgorithm: 'gzip',
    }))
    gz.forEach((b) => store.blobs.set(digestOf(b), b))
    const cached = memoryTransport(store, { layerInfosForCopy: () => substitutes })
    const dest = await cached.parseReference('src').newImageDestination()
    await putRandomImage(dest, plain)
    await dest.commit()
    const toStore = new MemoryStore()
    const r = await copyImage(cached.parseReference('src'), memoryTransport(toStore).parseReference('dst'))
    const m = JSON.parse(r.manifest.toString()) as ImageManifest
    expect(m.layers.map((l) => [l.digest, l.size, l.mediaType])).toEqual(substitutes.map((s) => [s.digest, s.size, MediaType.ociLayerGzip]))
    expect(await checkLayers(toStore, r.manifest)).toEqual(['gzip', 'gzip'])
    await expect(copyImage(cached.parseReference('src'), memoryTransport(toStore).parseReference('p'), { preserveDigests: true }))
      .rejects.toMatchObject({ code: 'DIGESTS_NOT_PRESERVED', message: expect.stringMatching(/variant/) })
  })
})

describe('copyImage: a destination that already has the manifest (hasManifest)', () => {
  it('writes nothing when the name already holds the manifest the copy would write', async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const dst = memoryTransport(store, { hasManifest: true, desiredLayerCompression: 'compress' })
    const image = await writeRandomImage(mem.parseReference('src'), { layers: 2 })
    const first = await copyImage(mem.parseReference('src'), dst.parseReference('dst'))
    expect(first).toMatchObject({ present: [], reused: 3 })
    expect(store.manifestChecks).toEqual([`dst ${image.manifestDigest}`])
    const events: CopyProgressEvent[] = []
    const again = await copyImage(mem.parseReference('src'), dst.parseReference('dst'), { onProgress: (e) => events.push(e) })
    expect(again).toMatchObject({ digest: image.manifestDigest, copied: 0, reused: 0, bytes: 0, present: [image.manifestDigest] })
    expect(again.manifest.equals(image.manifest)).toBe(true)
    expect(events).toEqual([])
    // rewriteExisting: not even asked
    const forced = await copyImage(mem.parseReference('src'), dst.parseReference('dst'), { rewriteExisting: true })
    expect(forced).toMatchObject({ reused: 3, present: [] })
    expect(store.manifestChecks).toHaveLength(2)
  })

  it('never asks when the manifest would change: a compression step, a conversion, a substitute, signatures to store', async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const dst = memoryTransport(store, { hasManifest: true })
    await writeRandomImage(mem.parseReference('plain'), { compression: null, seed: 3 })
    const plain = await copyImage(mem.parseReference('plain'), dst.parseReference('a'))
    expect(store.manifestChecks).toEqual([`a ${plain.digest}`])
    store.manifestChecks.length = 0
    const compressed = await copyImage(mem.parseReference('plain'), dst.parseReference('a'), { compression: 'compress' })
    expect(compressed.digest).not.toBe(plain.digest)
    const converted = await copyImage(mem.parseReference('plain'), dst.parseReference('a'), { manifestFormat: 'v2s2' })
    expect(converted.digest).not.toBe(plain.digest)
    expect(store.manifestChecks).toEqual([])
    // the source's variants (a blob cache's) change the manifest
    const gz = await buildRandomImage({ compression: null, layers: 1, seed: 4 })
    const variant = gzipSync(gz.blobs.get(gz.layers[0].digest)!)
    store.blobs.set(digestOf(variant), variant)
    const cached = memoryTransport(store, { layerInfosForCopy: () => [{ digest: digestOf(variant), size: variant.length, mediaType: MediaType.ociLayerGzip, compressionOperation: 'compress', compressionAlgorithm: 'gzip' }] })
    const d = await cached.parseReference('cached').newImageDestination()
    await putRandomImage(d, gz)
    await d.commit()
    await copyImage(cached.parseReference('cached'), dst.parseReference('b'))
    expect(store.manifestChecks).toEqual([])
    // signatures are written even to a name that has the manifest
    await writeRandomImage(mem.parseReference('signed'), { seed: 5 })
    store.images.get('signed')!.signatures.set('', [Buffer.from('sig')])
    const unsigned = await copyImage(mem.parseReference('signed'), dst.parseReference('c'), { removeSignatures: true })
    expect(unsigned.present).toEqual([])
    const signed = await copyImage(mem.parseReference('signed'), dst.parseReference('c'))
    expect(signed).toMatchObject({ digest: unsigned.digest, present: [], reused: 3 })
    expect(store.images.get('c')!.signatures.get('')).toEqual([Buffer.from('sig')])
    expect(store.manifestChecks).toEqual([`c ${unsigned.digest}`])
  })

  it("with 'all': the list by its name first, then each instance by digest", async () => {
    const store = new MemoryStore()
    const mem = memoryTransport(store)
    const dst = memoryTransport(store, { hasManifest: true })
    const platforms = [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }]
    const written = await writeRandomIndex(mem.parseReference('src'), platforms, { layers: 1 })
    await copyImage(mem.parseReference('src'), dst.parseReference('one'), { imageListSelection: 'all' })
    const [a, b] = written.images.map((i) => i.manifestDigest)
    expect(store.manifestChecks).toEqual([`one ${written.indexDigest}`, `one ${a} ${a}`, `one ${b} ${b}`])
    store.manifestChecks.length = 0
    const again = await copyImage(mem.parseReference('src'), dst.parseReference('one'), { imageListSelection: 'all' })
    expect(again).toMatchObject({ copied: 0, reused: 0, present: [written.indexDigest] })
    expect(store.manifestChecks).toEqual([`one ${written.indexDigest}`])
  })
})

describe('compressionStep', () => {
  it.each([
    [null, 'compress', 'gzip', false, { compress: 'gzip' }],
    ['gzip', 'compress', 'gzip', false, undefined],
    ['gzip', 'compress', 'zstd', false, undefined],
    ['gzip', 'compress', 'zstd', true, { decompress: 'gzip', compress: 'zstd' }],
    ['xz', 'compress', 'gzip', false, { decompress: 'xz', compress: 'gzip' }],
    ['zstd', 'decompress', 'gzip', false, { decompress: 'zstd' }],
    [null, 'decompress', 'gzip', false, undefined],
    ['gzip', 'preserve', 'zstd', true, undefined],
  ] as const)('%s %s %s (explicit %s)', (detected, op, alg, explicit, want) => {
    expect(compressionStep(detected, op, alg, explicit)).toEqual(want)
  })
})

