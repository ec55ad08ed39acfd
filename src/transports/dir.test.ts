import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { describeTransport, readAll, testDir } from '../../test/helpers/conformance.js'
import { peer } from '../../test/helpers/peers.js'
import { buildRandomImage, putRandomImage, writeRandomImage, writeRandomIndex } from '../../test/helpers/random-image.js'
import { skopeoOk } from '../../test/helpers/skopeo.js'
import { digestHex, digestOf } from '../digest.js'
import { DIR_VERSION, DirReference, dir } from './dir.js'

describeTransport('dir', (d) => new DirReference(join(d, 'image')))

describe('dir transport', () => {
  it('parses references and round-trips them', () => {
    const ref = dir.parseReference('some/relative/dir')
    expect(ref.stringWithinTransport()).toBe('some/relative/dir')
    expect((ref as DirReference).resolvedPath).toBe(resolve('some/relative/dir'))
    expect(ref.dockerReference()).toBeUndefined()
    expect(dir.parseReference('/abs/x').stringWithinTransport()).toBe('/abs/x')
    expect(() => dir.parseReference('')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
  })

  it('writes the version file, blobs named by hex and manifest.json', async () => {
    const path = join(await testDir(), 'img')
    const image = await writeRandomImage(new DirReference(path), { layers: 2 })
    expect(await readFile(join(path, 'version'), 'utf8')).toBe('Directory Transport Version: 1.1\n')
    expect(DIR_VERSION).toBe('Directory Transport Version: 1.1\n')
    expect((await readFile(join(path, 'manifest.json'))).equals(image.manifest)).toBe(true)
    const expected = ['manifest.json', 'version', ...[...image.blobs.keys()].map(digestHex)].sort()
    expect((await readdir(path)).sort()).toEqual(expected)
    for (const [digest, bytes] of image.blobs) expect((await readFile(join(path, digestHex(digest)))).equals(bytes)).toBe(true)
  })

  it('stores sha512 blobs under their hex, as containers/image does', async () => {
    const path = join(await testDir(), 'img')
    const dest = await new DirReference(path).newImageDestination()
    const bytes = Buffer.from('sha512 content')
    const digest = digestOf(bytes, 'sha512')
    await dest.putBlob(Readable.from([bytes]), { digest, size: bytes.length })
    await dest.commit()
    await dest.close()
    expect(await readFile(join(path, digestHex(digest)))).toEqual(bytes)
    const src = await new DirReference(path).newImageSource()
    expect(await readAll((await src.getBlob({ digest, size: -1 })).stream)).toEqual(bytes)
  })

  it('stores instance manifests as <hex>.manifest.json', async () => {
    const path = join(await testDir(), 'img')
    const written = await writeRandomIndex(new DirReference(path), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
    expect((await readFile(join(path, 'manifest.json'))).equals(written.index)).toBe(true)
    for (const im of written.images) {
      expect((await readFile(join(path, `${digestHex(im.manifestDigest)}.manifest.json`))).equals(im.manifest)).toBe(true)
    }
  })

  it('round-trips signatures of the image and of instances', async () => {
    const path = join(await testDir(), 'img')
    const ref = new DirReference(path)
    const image = await buildRandomImage({ layers: 1 })
    const dest = await ref.newImageDestination()
    await putRandomImage(dest, image)
    await dest.putManifest(image.manifest, image.manifestDigest)
    const sigs = [Buffer.from('first signature'), Buffer.from('second signature')]
    await dest.putSignatures!(sigs)
    await dest.putSignatures!([Buffer.from('instance signature')], image.manifestDigest)
    await dest.commit()
    await dest.close()
    expect(await readFile(join(path, 'signature-1'), 'utf8')).toBe('first signature')
    expect(await readFile(join(path, 'signature-2'), 'utf8')).toBe('second signature')
    expect(await readFile(join(path, `${digestHex(image.manifestDigest)}.signature-1`), 'utf8')).toBe('instance signature')
    const src = await ref.newImageSource()
    expect(await src.getSignatures()).toEqual(sigs)
    expect(await src.getSignatures(image.manifestDigest)).toEqual([Buffer.from('instance signature')])
    expect(await src.getSignatures(digestOf('other'))).toEqual([])
  })

  it('refuses a manifest whose bytes do not match the instance digest', async () => {
    const dest = await new DirReference(join(await testDir(), 'img')).newImageDestination()
    await expect(dest.putManifest(Buffer.from('{}'), digestOf('else'))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await dest.close()
  })

  it('makes manifest.json visible only at commit', async () => {
    const path = join(await testDir(), 'img')
    const image = await buildRandomImage()
    const dest = await new DirReference(path).newImageDestination()
    await putRandomImage(dest, image)
    expect(await readdir(path)).not.toContain('manifest.json')
    await dest.commit()
    await dest.close()
    expect(await readdir(path)).toContain('manifest.json')
  })

  it('refuses to overwrite a non-empty directory that is not a dir: image', async () => {
    const path = join(await testDir(), 'precious')
    await mkdir(path)
    await writeFile(join(path, 'notes.txt'), 'keep me')
    await expect(new DirReference(path).newImageDestination()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
    await writeFile(join(path, 'version'), 'Directory Transport Version: 9\n')
    await expect(new DirReference(path).newImageDestination()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
    expect((await readdir(path)).sort()).toEqual(['notes.txt', 'version'])
    const file = join(path, 'notes.txt')
    await expect(new DirReference(file).newImageDestination()).rejects.toMatchObject({ code: 'LAYOUT_INVALID' })
  })

  it('clears an existing dir: image before writing a new one', async () => {
    const path = join(await testDir(), 'img')
    const first = await writeRandomImage(new DirReference(path), { seed: 1 })
    const second = await writeRandomImage(new DirReference(path), { seed: 2 })
    const names = await readdir(path)
    for (const d of first.blobs.keys()) expect(names).not.toContain(digestHex(d))
    expect(names.sort()).toEqual(['manifest.json', 'version', ...[...second.blobs.keys()].map(digestHex)].sort())
  })

  it('does not delete images (UNSUPPORTED, like containers/image)', async () => {
    await expect(new DirReference('/nonexistent').deleteImage()).rejects.toMatchObject({ code: 'UNSUPPORTED' })
  })

  const skopeo = peer('skopeo')
  describe.skipIf(!skopeo)('with skopeo 1.9.3', () => {
    it('skopeo copies our dir: image to an identical dir: image', async () => {
      const tmp = await testDir()
      const ours = join(tmp, 'ours')
      const theirs = join(tmp, 'theirs')
      await writeRandomIndex(new DirReference(ours), [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
      await skopeoOk(['copy', '--all', `dir:${ours}`, `dir:${theirs}`])
      const names = (await readdir(ours)).sort()
      expect((await readdir(theirs)).sort()).toEqual(names)
      for (const n of names) expect((await readFile(join(theirs, n))).equals(await readFile(join(ours, n)))).toBe(true)
    })

    it('reads what skopeo writes', async () => {
      const tmp = await testDir()
      const image = await writeRandomImage(new DirReference(join(tmp, 'a')), { layers: 2, compression: null })
      await skopeoOk(['copy', '--dest-compress', `dir:${join(tmp, 'a')}`, `dir:${join(tmp, 'b')}`])
      const src = await new DirReference(join(tmp, 'b')).newImageSource()
      const { bytes } = await src.getManifest()
      const manifest = JSON.parse(bytes.toString()) as { config: { digest: string }; layers: { digest: string; size: number }[] }
      expect(manifest.config.digest).toBe(image.configDigest)
      for (const l of manifest.layers) {
        const blob = await src.getBlob({ digest: l.digest as never, size: l.size })
        expect(digestOf(await readAll(blob.stream))).toBe(l.digest)
      }
    })
  })
})
