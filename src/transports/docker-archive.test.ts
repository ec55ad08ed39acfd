import { execFileSync } from 'node:child_process'
import { createWriteStream } from 'node:fs'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { describeTransport, listTree, readAll, streamDigest, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { peer } from '../../test/helpers/peers.js'
import { type RandomImage, buildRandomImage, writeRandomImage } from '../../test/helpers/random-image.js'
import { skopeoInspect, skopeoInspectRaw, skopeoOk } from '../../test/helpers/skopeo.js'
import { compressStream } from '../compression.js'
import { type Digest, digestHex, digestOf } from '../digest.js'
import { parseManifest } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { type TarWriteEntry, writeTar } from '../tar.js'
import type { ImageReference, ImageSource } from '../types.js'
import { DockerArchiveReference, dockerArchive } from './docker-archive.js'
import { DirReference } from './dir.js'

// The source synthesises its manifest from manifest.json and the config (as containers/image
// does); for a Docker schema 2 image with plain or gzip layers it is the manifest written.
describeTransport('docker-archive', (dir) => dockerArchive.parseReference(`${join(dir, 'image.tar')}:example.com/test/image:v1`), {
  lists: false, formats: ['v2s2'], compressions: [null, 'gzip'],
})

const skopeo = peer('skopeo')

async function withSource<T>(ref: ImageReference, fn: (src: ImageSource) => Promise<T>): Promise<T> {
  const src = await ref.newImageSource()
  try {
    return await fn(src)
  } finally {
    await src.close()
  }
}

const archiveRef = (s: string) => dockerArchive.parseReference(s) as DockerArchiveReference

/** The manifest `src` serves, parsed, with every blob read and checked against its descriptor. */
async function readVerified(src: ImageSource) {
  const { bytes, mediaType } = await src.getManifest()
  expect(mediaType).toBe(MediaType.dockerManifest)
  const parsed = parseManifest(bytes, mediaType)
  if (parsed.kind !== 'image') throw new Error('expected an image')
  for (const d of [parsed.manifest.config, ...parsed.manifest.layers]) {
    const blob = await src.getBlob({ digest: d.digest, size: d.size })
    expect(blob.size).toBe(d.size)
    expect(await streamDigest(blob.stream)).toEqual({ digest: d.digest, size: d.size })
  }
  return { bytes, manifest: parsed.manifest }
}

const fromBuffer = (path: string, data: Buffer | string): TarWriteEntry => {
  const buf = Buffer.from(data)
  return { path, size: buf.length, open: () => Readable.from([buf]) }
}

/** A `docker save`-style archive of `images` built by hand; `layerFile` may replace a layer's bytes. */
async function handMade(file: string, images: { image: RandomImage; tags: string[] }[], opts: {
  layout?: 'legacy' | 'oci'
  layerFile?: (data: Buffer, i: number) => Buffer
  extra?: TarWriteEntry[]
  manifest?: (items: Record<string, unknown>[]) => unknown
} = {}): Promise<void> {
  const entries = new Map<string, TarWriteEntry>()
  const items = images.map(({ image, tags }) => {
    const name = (d: Digest, ext: string) => (opts.layout === 'oci' ? `blobs/sha256/${digestHex(d)}` : `${digestHex(d)}${ext}`)
    const layers = image.layers.map((l, i) => {
      const data = opts.layerFile ? opts.layerFile(image.blobs.get(l.digest)!, i) : image.blobs.get(l.digest)!
      const path = opts.layout === 'oci' ? `blobs/sha256/${digestHex(digestOf(data))}` : `${digestHex(l.diffID)}/layer.tar`
      entries.set(path, fromBuffer(path, data))
      return path
    })
    entries.set(name(image.configDigest, '.json'), fromBuffer(name(image.configDigest, '.json'), image.config))
    return { Config: name(image.configDigest, '.json'), RepoTags: tags, Layers: layers }
  })
  entries.set('manifest.json', fromBuffer('manifest.json', JSON.stringify(opts.manifest ? opts.manifest(items) : items)))
  if (opts.layout === 'oci') {
    entries.set('oci-layout', fromBuffer('oci-layout', '{"imageLayoutVersion":"1.0.0"}'))
    entries.set('index.json', fromBuffer('index.json', JSON.stringify({ schemaVersion: 2, manifests: [] })))
  }
  for (const e of opts.extra ?? []) entries.set(e.path, e)
  await writeTar(entries.values(), createWriteStream(file))
}

describe('docker-archive references', () => {
  it('parses path, path:name:tag and path:@N like containers/image', () => {
    expect(archiveRef('/a.tar').stringWithinTransport()).toBe('/a.tar')
    const named = archiveRef('/a.tar:busybox')
    expect(named.stringWithinTransport()).toBe('/a.tar:docker.io/library/busybox:latest')
    expect(named.dockerReference()?.toString()).toBe('docker.io/library/busybox:latest')
    expect(archiveRef('/a.tar:example.com:5000/x/y:v2').dockerReference()?.toString()).toBe('example.com:5000/x/y:v2')
    expect(archiveRef('/a.tar:@3')).toMatchObject({ path: '/a.tar', sourceIndex: 3 })
    expect(archiveRef('/a.tar:@3').stringWithinTransport()).toBe('/a.tar:@3')
    for (const bad of ['', ':x', '/a.tar:@x', '/a.tar:@-1', '/a.tar:UPPER', `/a.tar:x@${digestOf('x')}`]) {
      expect(() => archiveRef(bad), bad).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    }
  })

  it('refuses deleteImage, a source index as destination, and an existing archive', async () => {
    const dir = await testDir()
    await expect(archiveRef('/x.tar').deleteImage()).rejects.toMatchObject({ code: 'UNSUPPORTED' })
    await expect(archiveRef(`${join(dir, 'a.tar')}:@0`).newImageDestination()).rejects.toMatchObject({ code: 'REFERENCE_INVALID' })
    await writeFile(join(dir, 'full.tar'), 'something')
    await expect(archiveRef(join(dir, 'full.tar')).newImageDestination()).rejects.toMatchObject({ code: 'UNSUPPORTED' })
    await writeFile(join(dir, 'empty.tar'), '')
    await writeRandomImage(archiveRef(join(dir, 'empty.tar')), { format: 'v2s2', layers: 1 })
    await withSource(archiveRef(join(dir, 'empty.tar')), readVerified)
  })
})

describe('docker-archive round trips', () => {
  it.each([
    ['v2s2', null],
    ['v2s2', 'gzip'],
    ['oci', 'gzip'],
  ] as const)('writes a %s image with %s layers and reads the same image back', async (format, compression) => {
    const dir = await testDir()
    const ref = archiveRef(`${join(dir, 'image.tar')}:example.com/test/image:v1`)
    const image = await writeRandomImage(ref, { format, compression, layers: 3, layerSize: 30_000, seed: 5 })
    await withSource(ref, async (src) => {
      const { manifest } = await readVerified(src)
      expect(manifest.config).toEqual({ mediaType: MediaType.dockerConfig, size: image.config.length, digest: image.configDigest })
      if (format === 'v2s2') expect((await src.getManifest()).bytes.equals(image.manifest)).toBe(true)
      expect(manifest.layers).toEqual(image.layers.map((l) => ({
        mediaType: compression ? MediaType.dockerLayerGzip : MediaType.dockerLayer, size: l.size, digest: l.digest,
      })))
      const config = await src.getBlob({ digest: image.configDigest, size: -1 })
      expect((await readAll(config.stream)).equals(image.config)).toBe(true)
      await expect(src.getManifest(digestOf('other'))).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
      expect(await src.getSignatures()).toEqual([])
    })
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('refuses zstd layers and image lists', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ format: 'oci', compression: 'zstd', layers: 1 })
    const dest = await archiveRef(join(dir, 'a.tar')).newImageDestination()
    try {
      expect(dest.supportedManifestMIMETypes()).toEqual([MediaType.dockerManifest])
      expect(dest.desiredLayerCompression()).toBe('decompress')
      expect(dest.acceptsImageLists()).toBe(false)
      await expect(dest.putManifest(image.manifest)).rejects.toMatchObject({ code: 'UNSUPPORTED' })
      await expect(dest.putManifest(image.manifest, image.manifestDigest)).rejects.toMatchObject({ code: 'UNSUPPORTED' })
      const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [] }))
      await expect(dest.putManifest(index)).rejects.toMatchObject({ code: 'UNSUPPORTED' })
      await expect(dest.commit()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    } finally {
      await dest.close()
    }
    expect(await listTree(dir)).toEqual([])
  })
})

describe('reading docker save archives', () => {
  it('selects an image by RepoTag or @N, and asks for one when there are several', async () => {
    const dir = await testDir()
    const file = join(dir, 'two.tar')
    const a = await buildRandomImage({ format: 'v2s2', compression: null, seed: 1 })
    const b = await buildRandomImage({ format: 'v2s2', compression: null, seed: 2 })
    await handMade(file, [{ image: a, tags: ['alpine:3'] }, { image: b, tags: ['example.com/b:1', 'docker.io/library/b:2'] }])
    const configOf = (ref: string) => withSource(archiveRef(ref), async (s) => parseManifest((await s.getManifest()).bytes))
    expect(await configOf(`${file}:docker.io/library/alpine:3`)).toMatchObject({ manifest: { config: { digest: a.configDigest } } })
    expect(await configOf(`${file}:b:2`)).toMatchObject({ manifest: { config: { digest: b.configDigest } } })
    expect(await configOf(`${file}:@1`)).toMatchObject({ manifest: { config: { digest: b.configDigest } } })
    await expect(configOf(file)).rejects.toMatchObject({ code: 'REFERENCE_INVALID' })
    await expect(configOf(`${file}:alpine:4`)).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(configOf(`${file}:@2`)).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(configOf(join(dir, 'missing.tar'))).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
  })

  it('reads the OCI-style layout of docker 25+ (blobs/sha256 paths in manifest.json)', async () => {
    const dir = await testDir()
    const file = join(dir, 'docker25.tar')
    const image = await buildRandomImage({ format: 'v2s2', compression: null, layers: 2, seed: 8 })
    await handMade(file, [{ image, tags: ['docker.io/library/app:latest'] }], { layout: 'oci' })
    await withSource(archiveRef(`${file}:app`), async (src) => {
      const { manifest } = await readVerified(src)
      expect(manifest.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.diffID))
    })
  })

  it('serves gzip layer files as they are and zstd ones decompressed, on every open', async () => {
    const dir = await testDir()
    const file = join(dir, 'compressed.tar')
    const image = await buildRandomImage({ format: 'v2s2', compression: null, layers: 3, seed: 6 })
    const zstd = async (data: Buffer) => readAll(Readable.from([data]).pipe(compressStream('zstd')))
    const zstdLayer = await zstd(image.blobs.get(image.layers[2].digest)!)
    await handMade(file, [{ image, tags: [] }], { layerFile: (data, i) => (i === 1 ? gzipSync(data) : i === 2 ? zstdLayer : data) })
    const gz = gzipSync(image.blobs.get(image.layers[1].digest)!)
    for (let round = 0; round < 2; round++) {
      await withSource(archiveRef(file), async (src) => {
        const { manifest } = await readVerified(src)
        expect(manifest.layers).toEqual([
          { mediaType: MediaType.dockerLayer, size: image.layers[0].size, digest: image.layers[0].diffID },
          { mediaType: MediaType.dockerLayerGzip, size: gz.length, digest: digestOf(gz) },
          { mediaType: MediaType.dockerLayer, size: image.layers[2].size, digest: image.layers[2].diffID },
        ])
        const parts: Buffer[] = []
        for await (const s of src.getBlobAt!({ digest: digestOf(gz), size: gz.length }, [{ offset: 0, length: 10 }])) parts.push(await readAll(s))
        expect(parts[0].equals(gz.subarray(0, 10))).toBe(true)
      })
    }
  })
})

describe('hostile docker archives', () => {
  it.each([
    ['manifest.json symlinked outside', { extra: [{ path: 'manifest.json', type: 'symlink', linkname: '../../outside/manifest.json' }] }],
    ['a layer path with ".."', { manifest: (items: Record<string, unknown>[]) => items.map((it) => ({ ...it, Layers: ['../../etc/passwd'] })) }],
    ['an absolute config path', { manifest: (items: Record<string, unknown>[]) => items.map((it) => ({ ...it, Config: '/etc/passwd' })) }],
    ['a layer symlinked outside', { extra: [{ path: 'escape/layer.tar', type: 'symlink', linkname: '../../../x' }],
      manifest: (items: Record<string, unknown>[]) => items.map((it) => ({ ...it, Layers: ['escape/layer.tar'] })) }],
    ['a layer count that disagrees with the config', { manifest: (items: Record<string, unknown>[]) => items.map((it) => ({ ...it, Layers: [] })) }],
    ['a manifest.json that is not a list', { manifest: () => ({ Config: 'x' }) }],
  ] as [string, Parameters<typeof handMade>[2]][])('rejects %s with ARCHIVE_INVALID, reading nothing outside', async (_name, opts) => {
    const dir = await testDir()
    await mkdir(join(dir, 'outside'))
    await writeFile(join(dir, 'outside', 'manifest.json'), '[]')
    await mkdir(join(dir, 'a', 'b'), { recursive: true })
    const file = join(dir, 'a', 'b', 'evil.tar')
    const image = await buildRandomImage({ format: 'v2s2', compression: null, layers: 1 })
    await handMade(file, [{ image, tags: [] }], opts)
    const before = await listTree(dir)
    await expect(archiveRef(file).newImageSource()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect(await listTree(dir)).toEqual(before)
  })

  it('rejects a tar with a "../" entry, and fails BLOB_UNKNOWN for missing files', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ format: 'v2s2', compression: null, layers: 1 })
    const file = join(dir, 'evil.tar')
    await handMade(file, [{ image, tags: [] }])
    const bytes = await readFile(file)
    const h = Buffer.alloc(512)
    h.write('../evil', 0)
    h.write('0000644\0', 100)
    h.write('00000000000\0', 124)
    h.write('0', 156)
    h.write('ustar\x0000', 257, 'latin1')
    h.fill(0x20, 148, 156)
    h.write(h.reduce((a, b) => a + b, 0).toString(8).padStart(6, '0') + '\0 ', 148, 'latin1')
    await writeFile(file, Buffer.concat([h, bytes]))
    await expect(archiveRef(file).newImageSource()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    const missing = join(dir, 'missing.tar')
    await handMade(missing, [{ image, tags: [] }], { manifest: (items) => items.map((it) => ({ ...it, Layers: ['nothing/layer.tar'] })) })
    await expect(archiveRef(missing).newImageSource()).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    const noConfig = join(dir, 'no-config.tar')
    await handMade(noConfig, [{ image, tags: [] }], { manifest: (items) => items.map((it) => ({ ...it, Config: 'none.json' })) })
    await expect(archiveRef(noConfig).newImageSource()).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })
})

/**
 * Our source and skopeo describe an archive with the same config and layer digests and sizes;
 * only the layer media type differs: skopeo 1.9 says `diff.tar.gzip` even for plain tars.
 */
async function sameImageAsSkopeo(file: string): Promise<void> {
  const theirs = parseManifest(await skopeoInspectRaw(`docker-archive:${file}`))
  const ours = await withSource(archiveRef(file), async (s) => parseManifest((await s.getManifest()).bytes))
  if (theirs.kind !== 'image' || ours.kind !== 'image') throw new Error('expected images')
  expect(ours.manifest.config).toEqual(theirs.manifest.config)
  const strip = (l: { digest: string; size: number }) => ({ digest: l.digest, size: l.size })
  expect(ours.manifest.layers.map(strip)).toEqual(theirs.manifest.layers.map(strip))
  expect(theirs.manifest.layers.every((l) => l.mediaType === MediaType.dockerLayerGzip)).toBe(true)
  expect(ours.manifest.layers.every((l) => l.mediaType === MediaType.dockerLayer)).toBe(true)
}

describe.skipIf(!skopeo)('docker-archive interop with skopeo', () => {
  it('writes the archive skopeo 1.9 writes for the same image, byte for byte', async () => {
    const dir = await testDir()
    const image = await writeRandomImage(new DirReference(join(dir, 'src')), { format: 'v2s2', compression: null, layers: 2, seed: 12 })
    const ours = join(dir, 'ours.tar')
    const theirs = join(dir, 'theirs.tar')
    await writeRandomImage(archiveRef(`${ours}:example.com/foo/bar:v1`), { format: 'v2s2', compression: null, layers: 2, seed: 12 })
    await skopeoOk(['copy', `dir:${join(dir, 'src')}`, `docker-archive:${theirs}:example.com/foo/bar:v1`])
    const list = (f: string) => execFileSync('tar', ['-tf', f], { encoding: 'utf8' }).trim().split('\n').sort()
    expect(list(ours)).toEqual(list(theirs))
    const extract = (f: string, name: string) => execFileSync('tar', ['-xOf', f, name])
    for (const name of list(ours)) expect(extract(ours, name).equals(extract(theirs, name)), name).toBe(true)
    expect(list(ours)).toContain(`${digestHex(image.configDigest)}.json`)
    const verbose = (f: string) => execFileSync('tar', ['-tvf', f], { encoding: 'utf8' }).trim().split('\n').sort()
    expect(verbose(ours)).toEqual(verbose(theirs))
    // same entries in the same order with the same headers: the archives are byte for byte equal
    expect((await readFile(ours)).equals(await readFile(theirs))).toBe(true)
    await sameImageAsSkopeo(ours)
  })

  it('skopeo copies our archive to oci: and inspects it', async () => {
    const dir = await testDir()
    const file = join(dir, 'ours.tar')
    const image = await writeRandomImage(archiveRef(`${file}:localhost/ours:v1`), { format: 'v2s2', compression: null, layers: 2, seed: 13 })
    const direct = await skopeoInspect(`docker-archive:${file}`)
    expect(direct.Layers).toEqual(image.layers.map((l) => l.diffID))
    await skopeoOk(['copy', `docker-archive:${file}:localhost/ours:v1`, `oci:${join(dir, 'layout')}:v1`])
    const copied = await skopeoInspect(`oci:${join(dir, 'layout')}:v1`)
    expect(copied.Architecture).toBe('amd64')
    expect(copied.Layers).toHaveLength(2)
  })

  it.each([null, 'gzip'] as const)('reads an archive skopeo wrote from %s layers, every digest verified', async (compression) => {
    const dir = await testDir()
    const image = await writeRandomImage(new DirReference(join(dir, 'src')), { format: 'v2s2', compression, layers: 3, seed: 14 })
    const file = join(dir, 'skopeo.tar')
    await skopeoOk(['copy', `dir:${join(dir, 'src')}`, `docker-archive:${file}:example.com/x:y`])
    await withSource(archiveRef(`${file}:example.com/x:y`), async (src) => {
      const { bytes, manifest } = await readVerified(src)
      expect(manifest.config.digest).toBe(image.configDigest)
      expect(manifest.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.diffID))
      expect(bytes.equals(image.manifest)).toBe(compression === null)
    })
    await sameImageAsSkopeo(file)
  })
})
