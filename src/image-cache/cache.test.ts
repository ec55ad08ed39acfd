// ImageCache without a registry: linuxkit-cache.md section 5, scenarios 1-5, 16, 22-25, 32
// (the numbers are in the test names).
import { readFile, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { digestHex, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { AMD64, ARM64, attestation, image, putBlob, putImage, putIndex } from '../../test/helpers/image-cache-fixtures.js'
import { ImageCache } from './cache.js'
import { REF_NAME } from './names.js'

const blobFile = (dir: string, d: string) => join(dir, 'blobs', 'sha256', digestHex(d as never))

async function twoArch(dir: string, seed = 1) {
  const amd = await image(AMD64, seed)
  const arm = await image(ARM64, seed)
  const da = await putImage(dir, amd)
  const dr = await putImage(dir, arm)
  return { amd, arm, da, dr }
}

describe('ImageCache.open', () => {
  it('1: creates oci-layout and an empty index.json; reopening changes no byte', async () => {
    const dir = join(await testDir(), 'cache')
    await ImageCache.open(dir)
    expect(JSON.parse(await readFile(join(dir, 'oci-layout'), 'utf8'))).toEqual({ imageLayoutVersion: '1.0.0' })
    const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8'))
    expect(index).toEqual({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [] })
    const before = { layout: await readFile(join(dir, 'oci-layout')), index: await readFile(join(dir, 'index.json')), mtime: (await stat(join(dir, 'index.json'))).mtimeMs }
    await ImageCache.open(dir)
    expect(await readFile(join(dir, 'oci-layout'))).toEqual(before.layout)
    expect(await readFile(join(dir, 'index.json'))).toEqual(before.index)
    expect((await stat(join(dir, 'index.json'))).mtimeMs).toBe(before.mtime)
  })

  it('2: a truncated index.json is a clear "corrupt" error and is never replaced', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da } = await twoArch(dir)
    await cache.descriptorWrite('alpine', da)
    const size = (await stat(join(dir, 'index.json'))).size
    await truncate(join(dir, 'index.json'), Math.floor(size / 2))
    const damaged = await readFile(join(dir, 'index.json'))
    await expect(ImageCache.open(dir)).rejects.toMatchObject({ code: 'CACHE_INVALID', message: expect.stringContaining('corrupt image cache') })
    await expect(cache.list()).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    await expect(cache.descriptorWrite('other', da)).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    expect(await readFile(join(dir, 'index.json'))).toEqual(damaged)
  })

  it('rejects an oci-layout of another version', async () => {
    const dir = await testDir()
    await writeFile(join(dir, 'oci-layout'), '{"imageLayoutVersion":"2.0.0"}')
    await expect(ImageCache.open(dir)).rejects.toMatchObject({ code: 'CACHE_INVALID' })
  })
})

describe('findDescriptor', () => {
  it('3: expands names; docker.io/alpine and alpine are one key; localhost:5000/x gets :latest', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da } = await twoArch(dir)
    await cache.descriptorWrite('docker.io/alpine:1', da)
    expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/library/alpine:1'])
    expect((await cache.findDescriptor('alpine:1'))?.digest).toBe(da.digest)
    expect((await cache.findDescriptor('index.docker.io/library/alpine:1'))?.digest).toBe(da.digest)
    for (const [given, stored] of [
      ['foo/bar', 'docker.io/foo/bar:latest'], ['localhost/x', 'localhost/x:latest'], ['reg.io/x', 'reg.io/x:latest'],
      ['a/b/c', 'docker.io/a/b/c:latest'], ['localhost:5000/x', 'localhost:5000/x:latest'],
    ]) {
      await cache.descriptorWrite(given, da)
      expect((await cache.list()).map((e) => e.name)).toContain(stored)
      expect((await cache.findDescriptor(stored))?.digest).toBe(da.digest)
    }
  })

  it('4: by digest a root of another name is found; a child or unknown name is null; a bad digest throws', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da, dr } = await twoArch(dir)
    const ix = await putIndex(dir, [da, dr])
    await cache.descriptorWrite('multi:1', ix.descriptor)
    expect((await cache.findDescriptor(`n:t@${ix.descriptor.digest}`))?.digest).toBe(ix.descriptor.digest)
    expect(await cache.findDescriptor(`n:t@${da.digest}`)).toBeNull()
    expect(await cache.findDescriptor('unknown:1')).toBeNull()
    await expect(cache.findDescriptor('x@sha256:abc')).rejects.toMatchObject({ code: 'REFERENCE_INVALID' })
  })

  it('5: docker.io/library/a finds a:latest', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da } = await twoArch(dir)
    await cache.descriptorWrite('a:latest', da)
    expect((await cache.findDescriptor('docker.io/library/a'))?.digest).toBe(da.digest)
  })
})

describe('imageInCache', () => {
  it('16: true when whole; false naming the layer when one is gone; a single arm64 image is not amd64', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { amd, da, dr } = await twoArch(dir)
    const ix = await putIndex(dir, [da, dr])
    await cache.descriptorWrite('multi', ix.descriptor)
    expect(await cache.imageInCache('multi', 'linux/amd64')).toBe(true)
    expect(await cache.imageInCache('multi', 'linux/arm64/v8')).toBe(true)
    expect(await cache.imageInCache('multi', 'linux/riscv64')).toBe(false)
    await rm(blobFile(dir, amd.layers[1].digest))
    const check = await cache.checkImage('multi', 'linux/amd64')
    expect(check.complete).toBe(false)
    expect(check.missing.join()).toMatch(new RegExp(`layer ${amd.layers[1].digest} not found`))
    expect(await cache.imageInCache('multi', 'linux/arm64')).toBe(true)

    const arm = await image(ARM64, 7)
    const single = await putImage(dir, arm, false)
    await cache.descriptorWrite('armonly', single)
    expect(await cache.imageInCache('armonly', 'linux/amd64')).toBe(false)
    expect(await cache.imageInCache('armonly', 'linux/arm64')).toBe(true)
    expect(await cache.imageInCache('absent', 'linux/arm64')).toBe(false)
  })

  it('a truncated layer is not in the cache; a damaged one is found with verify', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { amd, da } = await twoArch(dir)
    await cache.descriptorWrite('img', da)
    const file = blobFile(dir, amd.layers[0].digest)
    const bytes = await readFile(file)
    await writeFile(file, bytes.subarray(0, bytes.length - 1))
    expect(await cache.imageInCache('img', 'linux/amd64')).toBe(false)
    bytes[10] ^= 0xff
    await writeFile(file, bytes)
    expect(await cache.imageInCache('img', 'linux/amd64')).toBe(true)
    expect(await cache.imageInCache('img', 'linux/amd64', { verify: true })).toBe(false)
  })
})

describe('indexWrite', () => {
  it('22: a new name gets exactly the descriptors, in order, named; none or an image name fails', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da, dr } = await twoArch(dir)
    const d = await cache.indexWrite('app:1', [da, dr])
    expect(d.annotations?.[REF_NAME]).toBe('docker.io/library/app:1')
    const index = JSON.parse(await readFile(blobFile(dir, d.digest), 'utf8'))
    expect(index.manifests.map((m: { digest: string }) => m.digest)).toEqual([da.digest, dr.digest])
    expect(index.mediaType).toBe(MediaType.ociIndex)
    await expect(cache.indexWrite('app:2', [])).rejects.toMatchObject({ code: 'MANIFEST_INVALID' })
    await cache.descriptorWrite('plain:1', da)
    await expect(cache.indexWrite('plain:1', [dr])).rejects.toMatchObject({ code: 'UNSUPPORTED' })
    const missing = { ...da, digest: digestOf('nothing') }
    await expect(cache.indexWrite('app:3', [missing])).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('23: replaces a platform in place, keeps arm64, drops the stale attestation, removes the old index blob', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da, dr } = await twoArch(dir)
    const att = attestation(da.digest, { spdxVersion: 'SPDX-2.3' })
    for (const b of att.blobs) await putBlob(dir, b)
    await putBlob(dir, att.manifest)
    const first = await cache.indexWrite('app:1', [da, dr, att.descriptor])
    const newAmd = await putImage(dir, await image(AMD64, 2))
    const second = await cache.indexWrite('app:1', [newAmd])
    const index = JSON.parse(await readFile(blobFile(dir, second.digest), 'utf8'))
    expect(index.manifests.map((m: { digest: string }) => m.digest)).toEqual([newAmd.digest, dr.digest])
    await expect(stat(blobFile(dir, first.digest))).rejects.toMatchObject({ code: 'ENOENT' })
    expect((await cache.list()).map((e) => e.descriptor.digest)).toEqual([second.digest])
  })

  it('merges by the full platform: arm/v6 and arm/v7 are different entries', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const v6 = await putImage(dir, await image({ os: 'linux', architecture: 'arm', variant: 'v6' }, 1))
    const v7 = await putImage(dir, await image({ os: 'linux', architecture: 'arm', variant: 'v7' }, 1))
    await cache.indexWrite('arm:1', [v6])
    const d = await cache.indexWrite('arm:1', [v7])
    const index = JSON.parse(await readFile(blobFile(dir, d.digest), 'utf8'))
    expect(index.manifests.map((m: { digest: string }) => m.digest)).toEqual([v6.digest, v7.digest])
  })

  it('24: a release tag sharing the index blob still resolves; adding two platforms is deterministic', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da, dr } = await twoArch(dir)
    const first = await cache.indexWrite('app:1', [da])
    await cache.descriptorWrite('app:release', first)
    await cache.indexWrite('app:1', [dr])
    const release = await cache.findDescriptor('app:release')
    expect(release?.digest).toBe(first.digest)
    expect(await cache.imageInCache('app:release', 'linux/amd64')).toBe(true)
    const digests = []
    for (let run = 0; run < 3; run++) {
      digests.push((await cache.indexWrite(`det:${run}`, [da, dr])).digest)
    }
    expect(new Set(digests).size).toBe(1)
  })
})

describe('descriptorWrite', () => {
  it('25: an empty name fails; writing twice gives one entry; other annotations stay; the caller object is untouched', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da } = await twoArch(dir)
    await expect(cache.descriptorWrite('', da)).rejects.toMatchObject({ code: 'REFERENCE_INVALID' })
    const given = { ...da, annotations: { 'org.example.kept': 'yes' } }
    await cache.descriptorWrite('x:1', given)
    await cache.descriptorWrite('x:1', given)
    const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8'))
    expect(index.manifests).toHaveLength(1)
    expect(index.manifests[0].annotations).toEqual({ 'org.example.kept': 'yes', [REF_NAME]: 'docker.io/library/x:1' })
    expect(index.manifests[0].platform).toEqual(AMD64)
    expect(given.annotations).toEqual({ 'org.example.kept': 'yes' })
    await expect(cache.descriptorWrite('y:1', { ...da, digest: digestOf('absent') })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })
})

describe('list, remove, gc, getContent', () => {
  it('32: list is exactly the named roots; remove keeps blobs another image uses; removing the unknown is a no-op', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const base = await image(AMD64, 3)
    const a = await putImage(dir, base)
    // B shares A's config and layers but has a manifest of its own
    const bManifest = Buffer.from(JSON.stringify({ ...JSON.parse(base.manifest.toString()), annotations: { b: '1' } }))
    const b = { mediaType: base.mediaType, digest: await putBlob(dir, bManifest), size: bManifest.length }
    await cache.descriptorWrite('a:1', a)
    await cache.descriptorWrite('b:1', b)
    expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/library/a:1', 'docker.io/library/b:1'])
    expect(await cache.remove('a:1')).toBe(true)
    expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/library/b:1'])
    expect(await cache.imageInCache('b:1', 'linux/amd64', { verify: true })).toBe(true)
    await expect(stat(blobFile(dir, a.digest))).rejects.toMatchObject({ code: 'ENOENT' })
    expect(await cache.remove('unknown:9')).toBe(false)
    expect(await cache.remove('b')).toBe(false) // b:latest is another name
    expect(await cache.remove('docker.io/b:1')).toBe(true)
    const left = (await readdir(join(dir, 'blobs', 'sha256'))).filter((n) => !n.startsWith('.'))
    expect(left).toEqual([])
  })

  it('gc removes unreferenced blobs past the grace period, temp files, and with verify damaged blobs', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { amd, da, dr } = await twoArch(dir)
    await cache.descriptorWrite('keep', da)
    await writeFile(join(dir, 'blobs', 'sha256', '.tmp-leftover'), 'x')
    expect((await cache.gc()).removed).toEqual([]) // everything is young
    const report = await cache.gc({ graceMs: 0 })
    expect(report.removed).toContain(dr.digest)
    expect(report.leftovers).toBe(1)
    expect(await cache.imageInCache('keep', 'linux/amd64')).toBe(true)
    const file = blobFile(dir, amd.layers[0].digest)
    const bytes = await readFile(file)
    bytes[20] ^= 1
    await writeFile(file, bytes)
    const verified = await cache.gc({ graceMs: 0, verify: true })
    expect(verified.damaged).toEqual([amd.layers[0].digest])
    expect(await cache.imageInCache('keep', 'linux/amd64')).toBe(false)
  })

  it('getContent verifies what it reads', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { amd } = await twoArch(dir)
    const layer = amd.layers[0]
    expect(digestOf(await readAll(await cache.getContent(layer.digest)))).toBe(layer.digest)
    const file = blobFile(dir, layer.digest)
    const bytes = await readFile(file)
    bytes[5] ^= 1
    await writeFile(file, bytes)
    await expect(readAll(await cache.getContent(layer.digest))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expect(cache.getContent(digestOf('none'))).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('36: concurrent calls on one instance are serialised: 30 descriptorWrites at once all land', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const { da } = await twoArch(dir)
    await Promise.all(Array.from({ length: 30 }, (_, i) => cache.descriptorWrite(`n${i}:1`, da)))
    const other = await ImageCache.open(dir)
    await Promise.all(Array.from({ length: 10 }, (_, i) => other.descriptorWrite(`m${i}:1`, da)))
    expect(await cache.list()).toHaveLength(40)
  })
})
