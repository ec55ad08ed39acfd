import { createReadStream } from 'node:fs'
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { checkImage, describeTransport, listTree, readAll, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { peer } from '../../test/helpers/peers.js'
import { buildRandomImage, putRandomImage, writeRandomImage, writeRandomIndex } from '../../test/helpers/random-image.js'
import { run, skopeoInspect, skopeoOk } from '../../test/helpers/skopeo.js'
import { type Digest, digestHex, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { OCI_REF_NAME, OciLayoutReference, initLayout, ociLayout, readLayoutIndex } from './oci-layout.js'

describeTransport('oci', (d) => new OciLayoutReference(join(d, 'layout'), 'latest'))
describeTransport('oci (unnamed)', (d) => new OciLayoutReference(join(d, 'layout')), { formats: ['oci'], compressions: ['gzip'] })

const blobFile = (layout: string, d: Digest) => join(layout, 'blobs', 'sha256', digestHex(d))
const entries = async (layout: string) => (await readLayoutIndex(layout)).manifests
const exists = (p: string) => readFile(p).then(() => true, () => false)

describe('oci layout transport', () => {
  it('parses path[:name], splitting at the first colon like containers/image', () => {
    const ref = ociLayout.parseReference('/srv/layout:docker.io/library/alpine:3.19') as OciLayoutReference
    expect(ref).toMatchObject({ dir: '/srv/layout', image: 'docker.io/library/alpine:3.19' })
    expect(ref.stringWithinTransport()).toBe('/srv/layout:docker.io/library/alpine:3.19')
    expect(ociLayout.parseReference('rel/dir').stringWithinTransport()).toBe('rel/dir')
    expect((ociLayout.parseReference('/x:') as OciLayoutReference).image).toBe('')
    expect(ociLayout.parseReference('/x:v1.0_rc-2').stringWithinTransport()).toBe('/x:v1.0_rc-2')
    expect(ref.dockerReference()).toBeUndefined()
    for (const bad of ['', ':tag', '/x:-bad', '/x:a//b', '/x:a b', '/x:tag/', '/x:@1']) {
      expect(() => ociLayout.parseReference(bad), bad).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    }
    expect(() => new OciLayoutReference('/a:b')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
  })

  it('keeps several named images in one layout', async () => {
    const layout = join(await testDir(), 'layout')
    const a = await writeRandomImage(new OciLayoutReference(layout, 'a'), { seed: 1 })
    const b = await writeRandomIndex(new OciLayoutReference(layout, 'b'), [{ os: 'linux', architecture: 'amd64' }])
    const c = await writeRandomImage(new OciLayoutReference(layout, 'example.com/c:1.0'), { seed: 3, format: 'v2s2' })
    expect(JSON.parse(await readFile(join(layout, 'oci-layout'), 'utf8'))).toEqual({ imageLayoutVersion: '1.0.0' })
    expect((await entries(layout)).map((e) => [e.annotations?.[OCI_REF_NAME], e.digest, e.mediaType])).toEqual([
      ['a', a.manifestDigest, MediaType.ociManifest],
      ['b', b.indexDigest, MediaType.ociIndex],
      ['example.com/c:1.0', c.manifestDigest, MediaType.dockerManifest],
    ])
    const srcA = await ociLayout.parseReference(`${layout}:a`).newImageSource()
    await checkImage(srcA, a)
    const srcB = await new OciLayoutReference(layout, 'b').newImageSource()
    expect((await srcB.getManifest()).bytes.equals(b.index)).toBe(true)
    await checkImage(srcB, b.images[0], b.images[0].manifestDigest)
    await checkImage(await new OciLayoutReference(layout, 'example.com/c:1.0').newImageSource(), c)
    await expect(new OciLayoutReference(layout).newImageSource()).rejects.toMatchObject({
      code: 'MANIFEST_UNKNOWN', message: expect.stringContaining('3 images'),
    })
    await expect(new OciLayoutReference(layout, 'd').newImageSource()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
  })

  it('moves a name to the new image, leaving the old entry unnamed', async () => {
    const layout = join(await testDir(), 'layout')
    const ref = new OciLayoutReference(layout, 'latest')
    const first = await writeRandomImage(ref, { seed: 1 })
    const second = await writeRandomImage(ref, { seed: 2 })
    const list = await entries(layout)
    expect(list).toHaveLength(2)
    expect(list[0]).toEqual({ mediaType: MediaType.ociManifest, digest: first.manifestDigest, size: first.manifest.length })
    expect(list[1].annotations).toEqual({ [OCI_REF_NAME]: 'latest' })
    await checkImage(await ref.newImageSource(), second)
    await writeRandomImage(ref, { seed: 2 }) // same digest again: still two entries
    expect(await entries(layout)).toHaveLength(2)
  })

  it('replaces an unnamed entry of the same digest and appends other unnamed images', async () => {
    const layout = join(await testDir(), 'layout')
    const ref = new OciLayoutReference(layout)
    await writeRandomImage(ref, { seed: 1 })
    await writeRandomImage(ref, { seed: 1 })
    expect(await entries(layout)).toHaveLength(1)
    await writeRandomImage(ref, { seed: 2 })
    expect(await entries(layout)).toHaveLength(2)
  })

  it('replaces index.json atomically and serialises concurrent commits', async () => {
    const layout = join(await testDir(), 'layout')
    const images = await Promise.all(
      Array.from({ length: 6 }, (_, i) => writeRandomImage(new OciLayoutReference(layout, `img${i}`), { seed: i, layers: 1 })),
    )
    const list = await entries(layout)
    expect(list.map((e) => e.annotations?.[OCI_REF_NAME]).sort()).toEqual(images.map((_, i) => `img${i}`))
    expect(await tempLeftovers(layout)).toEqual([])
    expect((await readdir(layout)).sort()).toEqual(['blobs', 'index.json', 'oci-layout'])
  })

  it('deleteImage removes the entry and only the blobs no other image uses', async () => {
    const layout = join(await testDir(), 'layout')
    // same seed: the first two layers are shared
    const a = await writeRandomImage(new OciLayoutReference(layout, 'a'), { seed: 5, layers: 2 })
    const b = await writeRandomImage(new OciLayoutReference(layout, 'b'), { seed: 5, layers: 3 })
    expect(b.layers[0].digest).toBe(a.layers[0].digest)
    await new OciLayoutReference(layout, 'b').deleteImage()
    expect((await entries(layout)).map((e) => e.annotations?.[OCI_REF_NAME])).toEqual(['a'])
    for (const d of a.blobs.keys()) expect(await exists(blobFile(layout, d))).toBe(true)
    expect(await exists(blobFile(layout, b.layers[2].digest))).toBe(false)
    expect(await exists(blobFile(layout, b.configDigest))).toBe(false)
    expect(await exists(blobFile(layout, b.manifestDigest))).toBe(false)
    await checkImage(await new OciLayoutReference(layout, 'a').newImageSource(), a)
    await expect(new OciLayoutReference(layout, 'b').deleteImage()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
  })

  it('deleteImage of an index removes its instances', async () => {
    const layout = join(await testDir(), 'layout')
    await writeRandomIndex(new OciLayoutReference(layout, 'multi'), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
    await new OciLayoutReference(layout, 'multi').deleteImage()
    expect(await entries(layout)).toEqual([])
    expect(await readdir(join(layout, 'blobs', 'sha256'))).toEqual([])
  })

  it('an uncommitted write keeps blobs shared with committed images', async () => {
    const layout = join(await testDir(), 'layout')
    const a = await writeRandomImage(new OciLayoutReference(layout, 'a'), { seed: 5, layers: 2 })
    const b = await buildRandomImage({ seed: 5, layers: 3 })
    const dest = await new OciLayoutReference(layout, 'b').newImageDestination()
    await putRandomImage(dest, b)
    await dest.close()
    await checkImage(await new OciLayoutReference(layout, 'a').newImageSource(), a)
    expect(await exists(blobFile(layout, b.layers[2].digest))).toBe(false)
    expect(await entries(layout)).toHaveLength(1)
  })

  it('fails with typed errors when index.json names missing blobs', async () => {
    const layout = join(await testDir(), 'layout')
    const a = await writeRandomImage(new OciLayoutReference(layout, 'a'), { layers: 1 })
    await rm(blobFile(layout, a.layers[0].digest))
    const src = await new OciLayoutReference(layout, 'a').newImageSource()
    await expect(src.getBlob({ digest: a.layers[0].digest, size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    await rm(blobFile(layout, a.manifestDigest))
    await expect(src.getManifest()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(src.getManifest(digestOf('absent'))).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(new OciLayoutReference(join(layout, 'nope')).newImageSource()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
  })

  it('detects a manifest blob whose bytes do not match its digest', async () => {
    const layout = join(await testDir(), 'layout')
    const a = await writeRandomImage(new OciLayoutReference(layout, 'a'), { layers: 1 })
    await writeFile(blobFile(layout, a.manifestDigest), a.manifest.toString().replace('"size"', ' "size"'))
    const src = await new OciLayoutReference(layout, 'a').newImageSource()
    await expect(src.getManifest()).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
  })

  it('never follows a malicious digest out of the layout', async () => {
    const tmp = await testDir()
    const layout = join(tmp, 'layout')
    await initLayout(layout)
    await writeFile(join(tmp, 'x'), '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}')
    const evil = { mediaType: MediaType.ociManifest, digest: 'sha256:../../x', size: 10, annotations: { [OCI_REF_NAME]: 'evil' } }
    await writeFile(join(layout, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [evil] }))
    await expect(new OciLayoutReference(layout, 'evil').newImageSource()).rejects.toMatchObject({ code: 'MANIFEST_INVALID' })
    await expect(new OciLayoutReference(layout, 'evil').deleteImage()).rejects.toMatchObject({ code: 'MANIFEST_INVALID' })
    await expect(readLayoutIndex(layout)).rejects.toMatchObject({ code: 'MANIFEST_INVALID' })
    // a good image beside it still works, and its source refuses bad digests from callers
    const good = await writeRandomImage(new OciLayoutReference(layout, 'good'), { layers: 1 })
    const src = await new OciLayoutReference(layout, 'good').newImageSource()
    await checkImage(src, good)
    await expect(src.getBlob({ digest: 'sha256:../../x' as Digest, size: -1 })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expect(src.getManifest('sha256:../../x' as Digest)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await readFile(join(tmp, 'x'), 'utf8')).toContain('schemaVersion')
  })

  it('refuses a layout with a bad oci-layout or index.json', async () => {
    const layout = join(await testDir(), 'layout')
    await mkdir(layout)
    await writeFile(join(layout, 'oci-layout'), '{"imageLayoutVersion":"2.0.0"}')
    await expect(new OciLayoutReference(layout).newImageDestination()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
    await writeFile(join(layout, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}')
    await writeFile(join(layout, 'index.json'), '{"manifests": 3}')
    await expect(new OciLayoutReference(layout).newImageSource()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
    await writeFile(join(layout, 'index.json'), 'not json')
    await expect(new OciLayoutReference(layout).newImageSource()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
    expect(await listTree(layout)).toEqual(expect.arrayContaining(['index.json', 'oci-layout']))
  })

  const skopeo = peer('skopeo')
  describe.skipIf(!skopeo)('with skopeo 1.9.3', () => {
    it('skopeo reads our layout and we read what skopeo writes into it', async () => {
      const layout = join(await testDir(), 'layout')
      const image = await writeRandomImage(new OciLayoutReference(layout, 'ours'), { layers: 2 })
      const inspected = await skopeoInspect(`oci:${layout}:ours`)
      expect(inspected.Digest).toBe(image.manifestDigest)
      expect(inspected.Layers).toEqual(image.layers.map((l) => l.digest))
      await skopeoOk(['copy', `oci:${layout}:ours`, `oci:${layout}:theirs`])
      await checkImage(await new OciLayoutReference(layout, 'theirs').newImageSource(), image)
      expect((await entries(layout)).map((e) => e.annotations?.[OCI_REF_NAME])).toEqual(['ours', 'theirs'])
      await new OciLayoutReference(layout, 'ours').deleteImage()
      await checkImage(await new OciLayoutReference(layout, 'theirs').newImageSource(), image)
      expect((await skopeoInspect(`oci:${layout}:theirs`)).Digest).toBe(image.manifestDigest)
    })

    it('skopeo copies a multi-arch index out of our layout', async () => {
      const tmp = await testDir()
      const layout = join(tmp, 'layout')
      const written = await writeRandomIndex(new OciLayoutReference(layout, 'multi'), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
      await skopeoOk(['copy', '--all', `oci:${layout}:multi`, `dir:${join(tmp, 'dir')}`])
      expect(await readFile(join(tmp, 'dir', 'manifest.json'))).toEqual(written.index)
    })
  })

  const umoci = peer('umoci')
  describe.skipIf(!umoci)('with umoci', () => {
    it('umoci lists and unpacks our images', async () => {
      const tmp = await testDir()
      const layout = join(tmp, 'layout')
      await writeRandomImage(new OciLayoutReference(layout, 'one'), { layers: 2, seed: 4 })
      await writeRandomImage(new OciLayoutReference(layout, 'two'), { layers: 1, seed: 6 })
      const ls = await run('umoci', ['ls', '--layout', layout], { check: true })
      expect(ls.stdout.split('\n').filter(Boolean).sort()).toEqual(['one', 'two'])
      const unpacked = await run('umoci', ['raw', 'unpack', '--rootless', '--image', `${layout}:one`, join(tmp, 'rootfs')])
      expect(unpacked.code, unpacked.stderr).toBe(0)
      const names = await readdir(join(tmp, 'rootfs'))
      expect(names.sort()).toEqual(['layer-0', 'layer-1'])
      expect((await readAll(createReadStream(join(tmp, 'rootfs', 'layer-1', 'random-4.bin')))).length).toBe(4096)
    })
  })
})
