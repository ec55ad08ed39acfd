// newSource and its exports: linuxkit-cache.md section 5, scenarios 15 (SBOMs, locally), 29, 31.
import { readFile, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { gunzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { digestHex, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { openTarIndex } from '../tar.js'
import { DockerArchiveReference } from '../transports/docker-archive.js'
import { readManifest } from '../image.js'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { AMD64, ARM64, attestation, image, putBlob, putImage, putIndex, whiteoutImage } from '../../test/helpers/image-cache-fixtures.js'
import { ImageCache } from './cache.js'
import { readTarStream } from './tar-stream.js'

async function tarNames(stream: NodeJS.ReadableStream): Promise<Map<string, Buffer>> {
  const files = new Map<string, Buffer>()
  await readTarStream(stream as never, async (e, data) => {
    const chunks: Buffer[] = []
    for await (const c of data) chunks.push(c)
    files.set(e.type === 'dir' ? `${e.path}/` : e.path, Buffer.concat(chunks))
  })
  return files
}

async function whiteoutCache() {
  const dir = await testDir()
  const cache = await ImageCache.open(dir)
  const w = whiteoutImage()
  for (const b of [...w.layers, w.config, w.manifest]) await putBlob(dir, b)
  await cache.descriptorWrite('wh:1', { mediaType: MediaType.ociManifest, digest: w.digest, size: w.manifest.length })
  return { dir, cache, w }
}

describe('newSource', () => {
  it('29: config() is the platform config; tarReader applies whiteouts, opaque dirs and replaced dirs', async () => {
    const { cache } = await whiteoutCache()
    const src = await cache.newSource('wh:1', 'linux/amd64')
    expect((await src.configJSON()).architecture).toBe('amd64')
    const files = await tarNames(src.tarReader())
    expect([...files.keys()].sort()).toEqual(['b', 'd/', 'd/y', 'e', 'f/', 'f/keep'])
    expect(files.get('b')!.toString()).toBe('b2')
    expect(files.get('e')!.toString()).toBe('now a file')
    // bottom layer first: directories come before what they contain
    const order = [...files.keys()]
    expect(order.indexOf('f/')).toBeLessThan(order.indexOf('f/keep'))
  })

  it('picks the platform config from an index and refuses a platform it lacks', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const amd = await image(AMD64, 21)
    const arm = await image(ARM64, 21)
    const ix = await putIndex(dir, [await putImage(dir, amd), await putImage(dir, arm)])
    await cache.descriptorWrite('multi:1', ix.descriptor)
    const src = await cache.newSource('multi:1', 'linux/arm64')
    expect((await src.configJSON()).architecture).toBe('arm64')
    expect(src.descriptor.digest).toBe(arm.manifestDigest)
    await expect(cache.newSource('multi:1', 'linux/s390x')).rejects.toMatchObject({ code: 'PLATFORM_UNKNOWN' })
    await expect(cache.newSource('nothing:1', 'linux/amd64')).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await rm(join(dir, 'blobs', 'sha256', digestHex(amd.layers[0].digest)))
    await expect(cache.newSource('multi:1', 'linux/amd64')).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('stays on the digests it opened even when the name moves', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const first = await putImage(dir, await image(AMD64, 22))
    const second = await putImage(dir, await image(AMD64, 23))
    await cache.descriptorWrite('moving:1', first)
    const src = await cache.newSource('moving:1', 'linux/amd64')
    await cache.descriptorWrite('moving:1', second)
    expect(src.descriptor.digest).toBe(first.digest)
  })

  it('15: sboms() returns the SPDX document of the platform attestation', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const da = await putImage(dir, await image(AMD64, 24))
    const dr = await putImage(dir, await image(ARM64, 24))
    const spdx = { spdxVersion: 'SPDX-2.3', name: 'amd64 sbom', packages: [{ name: 'musl' }] }
    const att = attestation(da.digest, spdx)
    for (const b of att.blobs) await putBlob(dir, b)
    await putBlob(dir, att.manifest)
    const ix = await putIndex(dir, [da, dr, att.descriptor])
    await cache.descriptorWrite('sbom:1', ix.descriptor)
    const sboms = await (await cache.newSource('sbom:1', 'linux/amd64')).sboms()
    expect(sboms.map((b) => JSON.parse(b.toString()))).toEqual([spdx])
    expect(await (await cache.newSource('sbom:1', 'linux/arm64')).sboms()).toEqual([])
  })

  it('31: v1TarReader writes a docker load archive with RepoTags = the override name', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 25)
    await cache.descriptorWrite('quay.io/org/app:1.0', await putImage(dir, im))
    const src = await cache.newSource('quay.io/org/app:1.0', 'linux/amd64')
    const out = join(dir, 'docker.tar')
    await writeFile(out, await readAll(src.v1TarReader({ name: 'myrepo/app:override' })))
    const index = await openTarIndex(out)
    const manifestJson = JSON.parse((await index.readFile('manifest.json')).toString())
    expect(manifestJson).toEqual([{
      Config: `blobs/sha256/${digestHex(im.configDigest)}`,
      RepoTags: ['myrepo/app:override'],
      Layers: im.layers.map((l) => `blobs/sha256/${digestHex(l.digest)}`),
    }])
    // our docker-archive transport reads it back, config digest and layer diffIDs intact
    const source = await DockerArchiveReference.parse(`${out}:myrepo/app:override`).newImageSource()
    const m = await readManifest(source)
    if (m.kind !== 'image') throw new Error('expected an image')
    expect(m.manifest.config.digest).toBe(im.configDigest)
    await source.close()
    // the default name is the image's own, in familiar form
    const own = await readAll(src.v1TarReader())
    await writeFile(out, own)
    expect(JSON.parse((await (await openTarIndex(out)).readFile('manifest.json')).toString())[0].RepoTags).toEqual(['quay.io/org/app:1.0'])
    // and its layers hold what the layer blobs hold
    const layer = await (await openTarIndex(out)).readFile(`blobs/sha256/${digestHex(im.layers[0].digest)}`)
    expect(digestOf(gunzipSync(layer))).toBe(im.layers[0].diffID)
  })

  it('31: an error mid-stream reaches the reader', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 26)
    await cache.descriptorWrite('broken:1', await putImage(dir, im))
    const src = await cache.newSource('broken:1', 'linux/amd64')
    const file = join(dir, 'blobs', 'sha256', digestHex(im.layers[1].digest))
    const bytes = await readFile(file)
    bytes[3] ^= 1
    await writeFile(file, bytes)
    await expect(readAll(src.v1TarReader())).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expect(readAll(src.ociTarReader())).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await rm(file)
    await expect(readAll(src.tarReader())).rejects.toThrow()
  })
})
