// The cache directory is a plain OCI layout: skopeo and umoci read it as `oci:` (and skopeo's
// writes into it are images the cache knows), including an index of which only one platform's
// blobs were pulled.
import { readFile, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ImageCache } from '../../src/image-cache/index.js'
import type { ImageIndex } from '../../src/manifest.js'
import { testDir } from '../helpers/conformance.js'
import { AMD64, ARM64, image, imageBlobs, ociArchiveFiles, putImage, putIndex, tarOf } from '../helpers/image-cache-fixtures.js'
import { peer } from '../helpers/peers.js'
import { buildRandomImage, putRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import { run, skopeoInspect, skopeoOk } from '../helpers/skopeo.js'

const skopeo = peer('skopeo')
const umoci = peer('umoci')
const registryTool = peer('docker-registry')

describe.skipIf(!skopeo)('skopeo reads and writes the cache as an oci: layout', () => {
  it('inspects and copies named images, single and multi-platform', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const amd = await image(AMD64, 61)
    const arm = await image(ARM64, 61)
    const ix = await putIndex(dir, [await putImage(dir, amd), await putImage(dir, arm)])
    await cache.descriptorWrite('example.com/team/multi:1', ix.descriptor)
    await cache.descriptorWrite('app:1', await putImage(dir, await image(AMD64, 62), false))
    const multi = JSON.parse((await skopeoOk(['--override-arch', 'amd64', 'inspect', `oci:${dir}:example.com/team/multi:1`])).stdout)
    expect(multi.Digest).toBe(ix.descriptor.digest)
    expect(multi.Layers).toEqual(amd.layers.map((l) => l.digest))
    const single = await skopeoInspect(`oci:${dir}:docker.io/library/app:1`)
    expect(single.Architecture).toBe('amd64')
    await skopeoOk(['copy', '--override-arch', 'arm64', `oci:${dir}:example.com/team/multi:1`, `oci:${root}/out:arm`])
    const outIndex = JSON.parse(await readFile(join(root, 'out', 'index.json'), 'utf8')) as ImageIndex
    expect(outIndex.manifests[0].digest).toBe(arm.manifestDigest)
  })

  it('an image skopeo copies into the cache directory is an image of the cache', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const src = join(root, 'src')
    const srcCache = await ImageCache.open(src)
    const im = await image(AMD64, 63)
    await srcCache.descriptorWrite('x:1', await putImage(src, im, false))
    await skopeoOk(['copy', `oci:${src}:docker.io/library/x:1`, `oci:${dir}:docker.io/library/from-skopeo:2`])
    expect((await cache.findDescriptor('from-skopeo:2'))?.digest).toBe(im.manifestDigest)
    expect(await cache.imageInCache('from-skopeo:2', 'linux/amd64', { verify: true })).toBe(true)
    // and what we export, skopeo reads as an oci-archive
    const tar = join(root, 'export.tar')
    const source = await cache.newSource('from-skopeo:2', 'linux/amd64')
    const chunks: Buffer[] = []
    for await (const c of source.ociTarReader()) chunks.push(c as Buffer)
    await writeFile(tar, Buffer.concat(chunks))
    expect((await skopeoInspect(`oci-archive:${tar}:docker.io/library/from-skopeo:2`)).Digest).toBe(im.manifestDigest)
    const docker = join(root, 'docker.tar')
    const dchunks: Buffer[] = []
    for await (const c of source.v1TarReader()) dchunks.push(c as Buffer)
    await writeFile(docker, Buffer.concat(dchunks))
    const fromDocker = await skopeoInspect(`docker-archive:${docker}`)
    expect(fromDocker.Architecture).toBe('amd64')
    expect(fromDocker.Layers).toHaveLength(im.layers.length)
  })
})

describe.skipIf(!skopeo || !registryTool)('skopeo reads a cache filled by a pull of one platform', () => {
  let registry: TestRegistry
  beforeAll(async () => {
    registry = await startRegistry()
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('skopeo copies the pulled platform out of the partial index', async () => {
    const amd = await buildRandomImage({ platform: AMD64, seed: 64 })
    const arm = await buildRandomImage({ platform: ARM64, seed: 64 })
    const dest = await registryRef(registry.host, 'interop/app:1').newImageDestination()
    for (const im of [amd, arm]) await putRandomImage(dest, im, true)
    await dest.putManifest(Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [amd, arm].map((im) => ({ mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length, platform: im.platform })),
    })))
    await dest.commit()
    await dest.close()
    const root = await testDir()
    const cache = await ImageCache.open(join(root, 'cache'), { registry: { tlsVerify: false } })
    const name = `${registry.host}/interop/app:1`
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    await skopeoOk(['copy', '--override-arch', 'amd64', `oci:${cache.dir}:${name}`, `dir:${root}/out`])
    const copied = await readdir(join(root, 'out'))
    for (const l of amd.layers) expect(copied).toContain(l.digest.slice('sha256:'.length))
  })
})

describe.skipIf(!umoci)('umoci reads the cache', () => {
  it('lists the names and unpacks an image', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 65)
    await cache.imageLoad(Readable.from([tarOf(ociArchiveFiles(imageBlobs(im), [{
      mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length,
      annotations: { 'io.containerd.image.name': 'docker.io/library/unpack-me:1' },
    }]))]))
    const ls = await run(umoci!, ['ls', '--layout', dir], { check: true })
    expect(ls.stdout.trim().split('\n')).toEqual(['docker.io/library/unpack-me:1'])
    const stat = await run(umoci!, ['stat', '--json', '--image', `${dir}:docker.io/library/unpack-me:1`], { check: true })
    expect(JSON.parse(stat.stdout).history).toHaveLength(im.layers.length)
    await run(umoci!, ['unpack', '--rootless', '--image', `${dir}:docker.io/library/unpack-me:1`, join(root, 'bundle')], { check: true })
    const files = await readdir(join(root, 'bundle', 'rootfs', 'layer-0'))
    expect(files).toEqual(['random-65.bin'])
  })
})
