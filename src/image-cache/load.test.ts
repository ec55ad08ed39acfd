// imageLoad: linuxkit-cache.md section 5, scenarios 18-21 and 30.
import { readFile, readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { digestHex, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { readAll, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import {
  AMD64, ARM64, image, imageBlobs, ociArchiveFiles, putImage, putIndex, tarOf,
} from '../../test/helpers/image-cache-fixtures.js'
import { ImageCache } from './cache.js'
import { CONTAINERD_NAME, REF_NAME } from './names.js'

const entryOf = (im: Awaited<ReturnType<typeof image>>, annotations?: Record<string, string>) => ({
  mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length, ...(annotations ? { annotations } : {}),
})

describe('imageLoad', () => {
  it('18: a buildkit-style tar is loaded: descriptors returned, name added, blobs present, manifest.json ignored', async () => {
    const cache = await ImageCache.open(await testDir())
    const im = await image(AMD64, 11)
    const files = ociArchiveFiles(imageBlobs(im), [entryOf(im, { [CONTAINERD_NAME]: 'docker.io/linuxkit/foo:abc-amd64', [REF_NAME]: 'abc-amd64' })])
    files.push({ path: 'manifest.json', data: '[{"Config":"nonsense"}]' })
    const descriptors = await cache.imageLoad(Readable.from([tarOf(files)]))
    expect(descriptors).toHaveLength(1)
    expect(descriptors[0]).toMatchObject({ digest: im.manifestDigest, annotations: { [REF_NAME]: 'docker.io/linuxkit/foo:abc-amd64' } })
    expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/linuxkit/foo:abc-amd64'])
    expect(await cache.imageInCache('linuxkit/foo:abc-amd64', 'linux/amd64', { verify: true })).toBe(true)
  })

  it('19: a tar with only ref.name, or with ./ paths, is imported and named', async () => {
    for (const prefix of ['', './']) {
      const cache = await ImageCache.open(await testDir())
      const im = await image(ARM64, 12)
      const files = ociArchiveFiles(imageBlobs(im), [entryOf(im, { [REF_NAME]: 'example.com/app:2' })], prefix)
      await cache.imageLoad(Readable.from([tarOf(files)]))
      expect((await cache.findDescriptor('example.com/app:2'))?.digest).toBe(im.manifestDigest)
      expect(await cache.imageInCache('example.com/app:2', 'linux/arm64')).toBe(true)
    }
  })

  it('loads an index whose archive holds one platform only, in chunks of odd sizes', async () => {
    const src = await testDir()
    const amd = await image(AMD64, 13)
    const arm = await image(ARM64, 13)
    const ix = await putIndex(src, [
      { ...entryOf(amd), platform: AMD64 }, { ...entryOf(arm), platform: ARM64 },
    ])
    const files = ociArchiveFiles([...imageBlobs(amd), ix.bytes], [{ ...ix.descriptor, annotations: { [CONTAINERD_NAME]: 'multi:1' } }])
    const tar = tarOf(files)
    const chunks: Buffer[] = []
    for (let i = 0; i < tar.length; i += 777) chunks.push(tar.subarray(i, i + 777))
    const cache = await ImageCache.open(await testDir())
    await cache.imageLoad(Readable.from(chunks))
    expect(await cache.imageInCache('multi:1', 'linux/amd64')).toBe(true)
    expect(await cache.imageInCache('multi:1', 'linux/arm64')).toBe(false)
  })

  it('20: a blob whose bytes do not match its name is refused and leaves no file', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 14)
    const files = ociArchiveFiles(imageBlobs(im), [entryOf(im, { [REF_NAME]: 'bad:1' })])
    const layerPath = `blobs/sha256/${digestHex(im.layers[0].digest)}`
    const forged = files.find((f) => f.path === layerPath)!
    const bytes = Buffer.from(forged.data)
    bytes[bytes.length - 1] ^= 0xff
    forged.data = bytes
    const before = await readFile(join(dir, 'index.json'))
    await expect(cache.imageLoad(Readable.from([tarOf(files)]))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expect(stat(join(dir, layerPath))).rejects.toMatchObject({ code: 'ENOENT' })
    expect(await readFile(join(dir, 'index.json'))).toEqual(before)
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('20: a truncated stream fails, leaves no short blob, and index.json valid and unchanged', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 15, 3)
    const tar = tarOf(ociArchiveFiles(imageBlobs(im), [entryOf(im, { [REF_NAME]: 'cut:1' })]))
    const before = await readFile(join(dir, 'index.json'))
    for (const cut of [700, 2000, Math.floor(tar.length / 2), tar.length - 1100]) {
      await expect(cache.imageLoad(Readable.from([tar.subarray(0, cut)]))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
      expect(await readFile(join(dir, 'index.json'))).toEqual(before)
      for (const name of await readdir(join(dir, 'blobs', 'sha256'))) {
        const bytes = await readFile(join(dir, 'blobs', 'sha256', name))
        expect(digestHex(digestOf(bytes))).toBe(name) // every file there is whole
      }
      expect(await tempLeftovers(dir)).toEqual([])
    }
  })

  it('a stream that errors mid-way rejects with its error and leaves nothing half-written', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 16)
    const tar = tarOf(ociArchiveFiles(imageBlobs(im), [entryOf(im, { [REF_NAME]: 'err:1' })]))
    const input = new PassThrough()
    input.write(tar.subarray(0, 3000))
    setTimeout(() => input.destroy(new Error('disk on fire')), 20)
    await expect(cache.imageLoad(input)).rejects.toThrow('disk on fire')
    expect(await tempLeftovers(dir)).toEqual([])
    expect(await cache.list()).toEqual([])
  })

  it('rejects an archive without index.json, or naming a manifest it lacks', async () => {
    const cache = await ImageCache.open(await testDir())
    const im = await image(AMD64, 17)
    await expect(cache.imageLoad(Readable.from([tarOf([{ path: 'oci-layout', data: '{}' }])]))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    const files = ociArchiveFiles([...im.blobs.values()], [entryOf(im, { [REF_NAME]: 'x:1' })])
    await expect(cache.imageLoad(Readable.from([tarOf(files)]))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })

  it('21: re-importing leaves existing blobs untouched (same inode and mtime)', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 18)
    const tar = tarOf(ociArchiveFiles(imageBlobs(im), [entryOf(im, { [REF_NAME]: 'again:1' })]))
    await cache.imageLoad(Readable.from([tar]))
    const file = join(dir, 'blobs', 'sha256', digestHex(im.layers[0].digest))
    const before = await stat(file)
    await new Promise((r) => setTimeout(r, 20))
    await cache.imageLoad(Readable.from([tar]))
    const after = await stat(file)
    expect([after.ino, after.mtimeMs]).toEqual([before.ino, before.mtimeMs])
  })

  it('30: ociTarReader output loads into a fresh cache with the same digest, name and manifest media type', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const amd = await image(AMD64, 19)
    const arm = await image(ARM64, 19)
    const ix = await putIndex(dir, [await putImage(dir, amd), await putImage(dir, arm)])
    await cache.descriptorWrite('registry.example/team/app:v1', ix.descriptor)
    const source = await cache.newSource('registry.example/team/app:v1', 'linux/arm64')
    const tar = await readAll(source.ociTarReader())
    const fresh = await ImageCache.open(await testDir())
    const loaded = await fresh.imageLoad(Readable.from([tar]))
    expect(loaded).toHaveLength(1)
    const found = await fresh.findDescriptor('registry.example/team/app:v1')
    expect(found).toMatchObject({ digest: arm.manifestDigest, mediaType: MediaType.ociManifest, platform: ARM64 })
    expect(await fresh.imageInCache('registry.example/team/app:v1', 'linux/arm64', { verify: true })).toBe(true)
  })
})
