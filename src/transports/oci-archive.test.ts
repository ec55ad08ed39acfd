import { execFileSync } from 'node:child_process'
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises'
import { createWriteStream } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { describeTransport, listTree, readAll, streamDigest, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { peer } from '../../test/helpers/peers.js'
import { type RandomImage, buildRandomImage, writeRandomImage } from '../../test/helpers/random-image.js'
import { skopeoInspect, skopeoOk } from '../../test/helpers/skopeo.js'
import { type Digest, digestHex, digestOf } from '../digest.js'
import { parseManifest } from '../manifest.js'
import { type TarWriteEntry, writeTar } from '../tar.js'
import type { ImageReference, ImageSource } from '../types.js'
import { OciArchiveReference, ociArchive } from './oci-archive.js'
import { OciLayoutReference } from './oci-layout.js'

describeTransport('oci-archive', (dir) => new OciArchiveReference(join(dir, 'image.tar'), 'latest'))

const skopeo = peer('skopeo')

async function withSource<T>(ref: ImageReference, fn: (src: ImageSource) => Promise<T>): Promise<T> {
  const src = await ref.newImageSource()
  try {
    return await fn(src)
  } finally {
    await src.close()
  }
}

/** Reads every blob of the image `src` serves and checks it hashes to its descriptor. */
async function verifyAllBlobs(src: ImageSource): Promise<Digest[]> {
  const { bytes, mediaType } = await src.getManifest()
  const parsed = parseManifest(bytes, mediaType)
  if (parsed.kind !== 'image') throw new Error('expected an image')
  const seen: Digest[] = []
  for (const d of [parsed.manifest.config, ...parsed.manifest.layers]) {
    const blob = await src.getBlob({ digest: d.digest, size: d.size })
    expect(blob.size).toBe(d.size)
    expect(await streamDigest(blob.stream)).toEqual({ digest: d.digest, size: d.size })
    seen.push(d.digest)
  }
  return seen
}

const fromBuffer = (path: string, data: Buffer | string): TarWriteEntry => {
  const buf = Buffer.from(data)
  return { path, size: buf.length, open: () => Readable.from([buf]) }
}

/** An OCI archive of `image` built by hand, with `override` replacing or adding entries. */
async function handMadeArchive(file: string, image: RandomImage, override: Record<string, TarWriteEntry | null> = {}): Promise<void> {
  const index = { schemaVersion: 2, manifests: [{ mediaType: image.mediaType, digest: image.manifestDigest, size: image.manifest.length }] }
  const entries = new Map<string, TarWriteEntry>([
    ['oci-layout', fromBuffer('oci-layout', '{"imageLayoutVersion":"1.0.0"}')],
    ['index.json', fromBuffer('index.json', JSON.stringify(index))],
    [`blobs/sha256/${digestHex(image.manifestDigest)}`, fromBuffer(`blobs/sha256/${digestHex(image.manifestDigest)}`, image.manifest)],
  ])
  for (const [d, data] of image.blobs) entries.set(`blobs/sha256/${digestHex(d)}`, fromBuffer(`blobs/sha256/${digestHex(d)}`, data))
  for (const [k, v] of Object.entries(override)) {
    if (v) entries.set(k, v)
    else entries.delete(k)
  }
  await writeTar(entries.values(), createWriteStream(file))
}

describe('oci-archive references', () => {
  it('parses and prints path[:name] like containers/image', () => {
    expect(ociArchive.parseReference('/a/b.tar').stringWithinTransport()).toBe('/a/b.tar')
    expect(ociArchive.parseReference('/a/b.tar:docker.io/library/x:1').stringWithinTransport()).toBe('/a/b.tar:docker.io/library/x:1')
    expect(() => ociArchive.parseReference(':x')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => ociArchive.parseReference('/a.tar:bad name')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(ociArchive.parseReference('/a.tar').dockerReference()).toBeUndefined()
  })

  it('refuses deleteImage', async () => {
    await expect(new OciArchiveReference('/x.tar').deleteImage()).rejects.toMatchObject({ code: 'UNSUPPORTED' })
  })
})

describe('oci-archive contents', () => {
  it('holds exactly the files an oci layout written with the same image holds', async () => {
    const dir = await testDir()
    const opts = { layers: 3, compression: 'gzip' as const, seed: 11 }
    await writeRandomImage(new OciArchiveReference(join(dir, 'image.tar'), 'v1'), opts)
    await writeRandomImage(new OciLayoutReference(join(dir, 'layout'), 'v1'), opts)
    const x = join(dir, 'x')
    await mkdir(x)
    execFileSync('tar', ['-xf', join(dir, 'image.tar'), '-C', x])
    const files = (await listTree(join(dir, 'layout'))).sort()
    expect((await listTree(x)).sort()).toEqual(files)
    for (const f of files) {
      if ((await stat(join(x, f))).isDirectory()) continue
      expect((await readFile(join(x, f))).equals(await readFile(join(dir, 'layout', f))), f).toBe(true)
    }
    const listing = execFileSync('tar', ['-tf', join(dir, 'image.tar')], { encoding: 'utf8' }).trim().split('\n')
    expect(listing.slice(0, 4)).toEqual(['oci-layout', 'index.json', 'blobs/', 'blobs/sha256/'])
  })

  it('replaces an existing archive on commit, as containers/image does', async () => {
    const dir = await testDir()
    const file = join(dir, 'image.tar')
    await writeRandomImage(new OciArchiveReference(file, 'first'), { seed: 1 })
    const second = await writeRandomImage(new OciArchiveReference(file, 'second'), { seed: 2 })
    await expect(withSource(new OciArchiveReference(file, 'first'), (s) => s.getManifest())).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    const got = await withSource(new OciArchiveReference(file), (s) => s.getManifest())
    expect(got.bytes.equals(second.manifest)).toBe(true)
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('leaves the old archive and no temporary file when a commit is aborted', async () => {
    const dir = await testDir()
    const file = join(dir, 'image.tar')
    await writeFile(file, 'old archive')
    const image = await buildRandomImage({ layers: 1, layerSize: 64 << 20, compression: null })
    const dest = await new OciArchiveReference(file).newImageDestination()
    try {
      for (const [d, data] of image.blobs) await dest.putBlob(Readable.from([data]), { digest: d, size: data.length })
      await dest.putManifest(image.manifest)
      const controller = new AbortController()
      const reason = new Error('stop the commit')
      setTimeout(() => controller.abort(reason), 20)
      await expect(dest.commit({ signal: controller.signal })).rejects.toBe(reason)
    } finally {
      await dest.close()
    }
    expect(await readFile(file, 'utf8')).toBe('old archive')
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('reads a layout packed by GNU tar as "./" paths, with a blob appended twice (the last wins)', async () => {
    const dir = await testDir()
    const layout = join(dir, 'layout')
    const image = await writeRandomImage(new OciLayoutReference(layout, 'v2'), { layers: 2, seed: 4 })
    const file = join(dir, 'gnu.tar')
    execFileSync('tar', ['-cf', file, '-C', layout, '.'])
    execFileSync('tar', ['-rf', file, '-C', layout, `./blobs/sha256/${digestHex(image.layers[1].digest)}`])
    await withSource(new OciArchiveReference(file, 'v2'), async (src) => {
      expect((await src.getManifest()).bytes.equals(image.manifest)).toBe(true)
      expect(await verifyAllBlobs(src)).toEqual([image.configDigest, ...image.layers.map((l) => l.digest)])
    })
  })

  it('serves byte ranges of a blob straight from the tar', async () => {
    const dir = await testDir()
    const ref = new OciArchiveReference(join(dir, 'image.tar'))
    const image = await writeRandomImage(ref, { layers: 1, layerSize: 10_000, compression: null })
    const layer = image.blobs.get(image.layers[0].digest)!
    await withSource(ref, async (src) => {
      const parts: Buffer[] = []
      for await (const s of src.getBlobAt!({ digest: image.layers[0].digest, size: layer.length }, [{ offset: 10, length: 100 }, { offset: 5000, length: -1 }])) {
        parts.push(await readAll(s))
      }
      expect(parts[0].equals(layer.subarray(10, 110))).toBe(true)
      expect(parts[1].equals(layer.subarray(5000))).toBe(true)
    })
  })
})

describe('hostile oci archives', () => {
  it('rejects an archive with a "../" entry and writes nothing outside', async () => {
    const dir = await testDir()
    const file = join(dir, 'in', 'evil.tar')
    await mkdir(join(dir, 'in'))
    const image = await buildRandomImage({ layers: 1 })
    await handMadeArchive(file, image)
    // splice a raw `../evil` header in front of the end-of-archive blocks
    const bytes = await readFile(file)
    const h = Buffer.alloc(512)
    h.write('../evil', 0)
    h.write('0000644\0', 100)
    h.write('00000000000\0', 124)
    h.write('0', 156)
    h.write('ustar\x0000', 257, 'latin1')
    h.fill(0x20, 148, 156)
    h.write(h.reduce((a, b) => a + b, 0).toString(8).padStart(6, '0') + '\0 ', 148, 'latin1')
    await writeFile(file, Buffer.concat([bytes.subarray(0, bytes.length - 1024), h, Buffer.alloc(1024)]))
    const before = await listTree(dir)
    await expect(new OciArchiveReference(file).newImageSource()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect(await listTree(dir)).toEqual(before)
  })

  it('refuses an index.json symlinked out of the archive', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ layers: 1 })
    const outside = join(dir, 'outside')
    await mkdir(outside)
    await writeFile(join(outside, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [] }))
    const file = join(dir, 'a', 'b', 'evil.tar')
    await mkdir(join(dir, 'a', 'b'), { recursive: true })
    await handMadeArchive(file, image, { 'index.json': { path: 'index.json', type: 'symlink', linkname: '../../outside/index.json' } })
    await expect(new OciArchiveReference(file).newImageSource()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })

  it('refuses a blob entry symlinked out of the archive, and follows one that stays inside', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ layers: 2 })
    const [escaping, inside] = image.layers.map((l) => `blobs/sha256/${digestHex(l.digest)}`)
    const file = join(dir, 'evil.tar')
    await handMadeArchive(file, image, {
      [escaping]: { path: escaping, type: 'symlink', linkname: '../../../../../etc/passwd' },
      [inside]: { path: inside, type: 'symlink', linkname: '../../elsewhere/layer' },
      'elsewhere/layer': fromBuffer('elsewhere/layer', image.blobs.get(image.layers[1].digest)!),
    })
    await withSource(new OciArchiveReference(file), async (src) => {
      await expect(src.getBlob({ digest: image.layers[0].digest, size: -1 })).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
      const ok = await src.getBlob({ digest: image.layers[1].digest, size: -1 })
      expect((await streamDigest(ok.stream)).digest).toBe(image.layers[1].digest)
    })
  })

  it('fails BLOB_UNKNOWN and MANIFEST_UNKNOWN for what index.json names but the tar lacks', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ layers: 1 })
    const file = join(dir, 'partial.tar')
    await handMadeArchive(file, image, { [`blobs/sha256/${digestHex(image.layers[0].digest)}`]: null })
    await withSource(new OciArchiveReference(file), async (src) => {
      expect((await src.getManifest()).bytes.equals(image.manifest)).toBe(true)
      await expect(src.getBlob({ digest: image.layers[0].digest, size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    })
    const noManifest = join(dir, 'no-manifest.tar')
    await handMadeArchive(noManifest, image, { [`blobs/sha256/${digestHex(image.manifestDigest)}`]: null })
    await withSource(new OciArchiveReference(noManifest), async (src) => {
      await expect(src.getManifest()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    })
  })

  it('rejects a truncated archive and a manifest that does not match its digest', async () => {
    const dir = await testDir()
    const image = await buildRandomImage({ layers: 1 })
    const file = join(dir, 'a.tar')
    await handMadeArchive(file, image)
    const bytes = await readFile(file)
    await writeFile(join(dir, 'cut.tar'), bytes.subarray(0, bytes.length - 1024 - 700))
    await expect(new OciArchiveReference(join(dir, 'cut.tar')).newImageSource()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    const forged = join(dir, 'forged.tar')
    const other = Buffer.from(image.manifest.toString().replace('"schemaVersion":2', '"schemaVersion":2 '))
    await handMadeArchive(forged, image, { [`blobs/sha256/${digestHex(image.manifestDigest)}`]: fromBuffer(`blobs/sha256/${digestHex(image.manifestDigest)}`, other) })
    await withSource(new OciArchiveReference(forged), async (src) => {
      await expect(src.getManifest()).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    })
  })
})

describe.skipIf(!skopeo)('oci-archive interop with skopeo', () => {
  it('skopeo copies our archive to oci: and inspects it', async () => {
    const dir = await testDir()
    const file = join(dir, 'ours.tar')
    const image = await writeRandomImage(new OciArchiveReference(file, 'v1'), { layers: 2, compression: 'gzip', seed: 5 })
    const direct = await skopeoInspect(`oci-archive:${file}:v1`)
    expect(direct.Digest).toBe(image.manifestDigest)
    await skopeoOk(['copy', `oci-archive:${file}:v1`, `oci:${join(dir, 'layout')}:v1`])
    const copied = await skopeoInspect(`oci:${join(dir, 'layout')}:v1`)
    expect(copied.Digest).toBe(image.manifestDigest)
    expect(copied.Layers).toEqual(image.layers.map((l) => l.digest))
  })

  it.each([null, 'gzip'] as const)('reads an archive skopeo wrote (%s layers), every digest verified', async (compression) => {
    const dir = await testDir()
    const image = await writeRandomImage(new OciLayoutReference(join(dir, 'layout'), 'src'), { layers: 3, compression, seed: 9 })
    const file = join(dir, 'skopeo.tar')
    await skopeoOk(['copy', `oci:${join(dir, 'layout')}:src`, `oci-archive:${file}:tagged`])
    await withSource(new OciArchiveReference(file, 'tagged'), async (src) => {
      const { bytes } = await src.getManifest()
      const digests = await verifyAllBlobs(src)
      // containers/image's oci destinations compress plain layers, so only gzip ones keep their digests
      if (compression === 'gzip') {
        expect(digestOf(bytes)).toBe(image.manifestDigest)
        expect(digests).toEqual([image.configDigest, ...image.layers.map((l) => l.digest)])
      } else {
        expect(digests[0]).toBe(image.configDigest)
        expect(digests).toHaveLength(4)
      }
    })
  })

})
