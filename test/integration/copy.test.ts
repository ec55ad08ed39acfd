// copyImage between the real on-disk transports (dir:, oci:), checked on disk and, where skopeo
// is installed, by skopeo reading what we wrote and writing what we read.
import { readdirSync } from 'node:fs'
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { describe, expect, it, onTestFinished } from 'vitest'
import { decompressStream, detectCompression } from '../../src/compression.js'
import { type CopyProgressEvent, copyImage } from '../../src/copy.js'
import { type Digest, digestOf } from '../../src/digest.js'
import { readConfig, readManifest } from '../../src/image.js'
import { type ImageIndex, type ImageManifest, layerCompressionOf } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { dir } from '../../src/transports/dir.js'
import { dockerArchive } from '../../src/transports/docker-archive.js'
import { ociLayout } from '../../src/transports/oci-layout.js'
import type { BlobInfo, ImageReference, ImageSource } from '../../src/types.js'
import { overrideSource } from '../helpers/conformance.js'
import { MemoryStore, memoryTransport } from '../helpers/memory-transport.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage, writeRandomIndex } from '../helpers/random-image.js'
import { skopeoInspectRaw, skopeoOk } from '../helpers/skopeo.js'

async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-copy-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

/** Every file under `root`, relative. */
async function files(root: string): Promise<string[]> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true }).catch(() => [])
  return entries.filter((e) => e.isFile()).map((e) => relative(root, join(e.parentPath ?? e.path, e.name))).sort()
}

async function readAll(src: ImageSource, digest: Digest): Promise<Buffer> {
  const { stream } = await src.getBlob({ digest, size: -1 })
  const chunks: Buffer[] = []
  for await (const c of stream) chunks.push(c as Buffer)
  return Buffer.concat(chunks)
}

async function decompress(data: Buffer): Promise<Buffer> {
  const alg = detectCompression(data)
  if (!alg) return data
  const chunks: Buffer[] = []
  await pipeline(Readable.from([data]), decompressStream(alg), new Writable({ write(c: Buffer, _e, cb) { chunks.push(c); cb() } }))
  return Buffer.concat(chunks)
}

/** Reads an image back and checks every layer against the config's diff_ids; returns the layer compressions. */
async function verifyImage(ref: ImageReference): Promise<{ manifest: ImageManifest; algs: (string | null)[] }> {
  const src = await ref.newImageSource()
  try {
    const m = await readManifest(src)
    if (m.kind !== 'image') throw new Error('expected an image')
    const config = JSON.parse((await readConfig(src, m.manifest)).toString()) as { rootfs: { diff_ids: string[] } }
    const algs: (string | null)[] = []
    for (const [i, l] of m.manifest.layers.entries()) {
      const data = await readAll(src, l.digest)
      expect(digestOf(data)).toBe(l.digest)
      expect(data.length).toBe(l.size)
      expect(detectCompression(data)).toBe(layerCompressionOf(l.mediaType))
      expect(digestOf(await decompress(data))).toBe(config.rootfs.diff_ids[i])
      algs.push(detectCompression(data))
    }
    return { manifest: m.manifest, algs }
  } finally {
    await src.close()
  }
}

function filesSync(root: string): string[] {
  try {
    return readdirSync(root, { recursive: true, withFileTypes: true }).filter((e) => e.isFile())
      .map((e) => relative(root, join(e.parentPath ?? e.path, e.name)))
  } catch {
    return []
  }
}

const noTemps = (list: string[]) => expect(list.filter((f) => f.split('/').some((p) => p.startsWith('.tmp-')))).toEqual([])

describe('copyImage between dir: and oci:', () => {
  it('copies dir -> oci -> dir keeping the digest', async () => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'a')), { layers: 3 })
    const r1 = await copyImage(dir.parseReference(join(root, 'a')), ociLayout.parseReference(`${join(root, 'layout')}:v1`))
    expect(r1).toMatchObject({ digest: image.manifestDigest, copied: 4, reused: 0 })
    const r2 = await copyImage(ociLayout.parseReference(`${join(root, 'layout')}:v1`), dir.parseReference(join(root, 'b')))
    expect(r2.digest).toBe(image.manifestDigest)
    expect((await readFile(join(root, 'b', 'manifest.json'))).equals(image.manifest)).toBe(true)
    expect(await files(join(root, 'b'))).toEqual(
      [...image.layers.map((l) => l.digest), image.configDigest].map((d) => d.slice(7)).concat('manifest.json', 'version').sort(),
    )
    await verifyImage(dir.parseReference(join(root, 'b')))
  })

  it("copies a whole index with 'all', and one platform by default", async () => {
    const root = await tempDir()
    const ix = await writeRandomIndex(dir.parseReference(join(root, 'src')), [
      { os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' },
    ])
    const layout = join(root, 'layout')
    const r = await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:all`), { imageListSelection: 'all' })
    expect(r).toMatchObject({ digest: ix.indexDigest, mediaType: MediaType.ociIndex, copied: 6 })
    const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as ImageIndex
    expect(index.manifests).toEqual([expect.objectContaining({ digest: ix.indexDigest, mediaType: MediaType.ociIndex })])
    for (const im of ix.images) expect((await readFile(join(layout, 'blobs', 'sha256', im.manifestDigest.slice(7)))).equals(im.manifest)).toBe(true)

    const one = await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:one`), {
      platform: { os: 'linux', architecture: 'arm64' },
    })
    expect(one).toMatchObject({ digest: ix.images[1].manifestDigest, copied: 0, reused: 3 })
  })

  it.each([
    { from: null, compression: 'compress', algorithm: undefined, want: 'gzip' },
    { from: null, compression: 'compress', algorithm: 'zstd', want: 'zstd' },
    { from: 'gzip', compression: 'compress', algorithm: 'zstd', want: 'zstd' },
    { from: 'gzip', compression: 'decompress', algorithm: undefined, want: null },
    { from: 'zstd', compression: 'decompress', algorithm: undefined, want: null },
  ] as const)('$compression ($algorithm) turns $from layers into $want on disk', async ({ from, compression, algorithm, want }) => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'src')), { compression: from, layerSize: 300_000 })
    const dest = ociLayout.parseReference(`${join(root, 'layout')}:x`)
    const r = await copyImage(dir.parseReference(join(root, 'src')), dest, { compression, compressionAlgorithm: algorithm })
    const { manifest, algs } = await verifyImage(dest)
    expect(algs).toEqual([want, want])
    expect(manifest.config.digest).toBe(image.configDigest)
    expect(r.digest).toBe(digestOf(r.manifest))
    expect(r.digest).not.toBe(image.manifestDigest)
    noTemps(await files(join(root, 'layout')))
  })

  it('converts Docker schema 2 to OCI for an oci: destination, and back when forced', async () => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'v2')), { format: 'v2s2' })
    const oci = ociLayout.parseReference(`${join(root, 'layout')}:x`)
    const r = await copyImage(dir.parseReference(join(root, 'v2')), oci)
    expect(r.mediaType).toBe(MediaType.ociManifest)
    const { manifest } = await verifyImage(oci)
    expect(manifest.config).toMatchObject({ mediaType: MediaType.ociConfig, digest: image.configDigest })
    expect(manifest.layers.map((l) => l.mediaType)).toEqual([MediaType.ociLayerGzip, MediaType.ociLayerGzip])
    const back = await copyImage(oci, dir.parseReference(join(root, 'back')), { manifestFormat: 'v2s2' })
    expect(back.mediaType).toBe(MediaType.dockerManifest)
    expect(JSON.parse(back.manifest.toString())).toEqual(JSON.parse(image.manifest.toString()))
  })

  it("follows the destination's desired compression: gzip and zstd layers go into docker-archive: uncompressed", async () => {
    const root = await tempDir()
    for (const compression of ['gzip', 'zstd'] as const) {
      const src = dir.parseReference(join(root, `src-${compression}`))
      const image = await writeRandomImage(src, { compression, layers: 2, layerSize: 100_000 })
      const archive = dockerArchive.parseReference(`${join(root, `${compression}.tar`)}:example.com/wants/plain:v1`)
      const r = await copyImage(src, archive) // no compression option: docker-archive desires decompress
      expect(r.mediaType).toBe(MediaType.dockerManifest)
      const { manifest, algs } = await verifyImage(archive)
      expect(algs).toEqual([null, null])
      expect(manifest.layers.map((l) => [l.digest, l.mediaType])).toEqual(image.layers.map((l) => [l.diffID, MediaType.dockerLayer]))
      expect(manifest.config.digest).toBe(image.configDigest)
    }
    // while dir: keeps what it is given
    const kept = await copyImage(dir.parseReference(join(root, 'src-gzip')), dir.parseReference(join(root, 'kept')))
    expect((await verifyImage(dir.parseReference(join(root, 'kept')))).algs).toEqual(['gzip', 'gzip'])
    expect(kept.digest).toBe(digestOf(await readFile(join(root, 'src-gzip', 'manifest.json'))))
  })

  it('refuses with preserveDigests before writing anything', async () => {
    const root = await tempDir()
    await writeRandomImage(dir.parseReference(join(root, 'v2')), { format: 'v2s2' })
    const layout = join(root, 'layout')
    await expect(copyImage(dir.parseReference(join(root, 'v2')), ociLayout.parseReference(`${layout}:x`), { preserveDigests: true }))
      .rejects.toMatchObject({ code: 'DIGESTS_NOT_PRESERVED', message: expect.stringMatching(/converted to oci/) })
    expect((await files(layout)).filter((f) => f.startsWith('blobs/sha256/'))).toEqual([])
  })

  it('reuses blobs already in the layout', async () => {
    const root = await tempDir()
    await writeRandomImage(dir.parseReference(join(root, 'src')))
    const layout = join(root, 'layout')
    await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:a`))
    const events: CopyProgressEvent[] = []
    const r = await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:b`), { onProgress: (e) => events.push(e) })
    expect(r).toMatchObject({ copied: 0, reused: 3 })
    expect(events.map((e) => e.type)).toEqual(['reused', 'reused', 'reused'])
  })

  it.each(['dir', 'oci'])('fails DIGEST_INVALID on corrupt source bytes and leaves nothing in %s:', async (kind) => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'src')), { layers: 3, layerSize: 200_000 })
    const victim = join(root, 'src', image.layers[2].digest.slice(7))
    const bytes = await readFile(victim)
    bytes[1000] ^= 0xff
    await writeFile(victim, bytes)
    const out = join(root, 'out')
    const dest = kind === 'dir' ? dir.parseReference(out) : ociLayout.parseReference(`${out}:x`)
    for (const compression of ['preserve', 'compress'] as const) {
      await expect(copyImage(dir.parseReference(join(root, 'src')), dest, { compression, compressionAlgorithm: 'zstd' }))
        .rejects.toMatchObject({ code: 'DIGEST_INVALID' })
      const left = await files(out)
      noTemps(left)
      expect(left.filter((f) => /[0-9a-f]{64}/.test(f))).toEqual([])
      expect(left).not.toContain('manifest.json')
    }
  })

  it.each(['dir', 'oci'])('rejects with the abort reason mid-copy and leaves no temp files in %s:', async (kind) => {
    const root = await tempDir()
    const store = new MemoryStore()
    const slow = memoryTransport(store, { chunkSize: 256 << 10, delayMs: 10 })
    await writeRandomImage(slow.parseReference('src'), { layers: 3, layerSize: 4 << 20, compression: null })
    const out = join(root, 'out')
    const dest = kind === 'dir' ? dir.parseReference(out) : ociLayout.parseReference(`${out}:x`)
    for (const compression of ['preserve', 'compress'] as const) {
      const ac = new AbortController()
      const reason = new Error(`stop ${compression}`)
      let progress = 0
      let midway: string[] = []
      const p = copyImage(slow.parseReference('src'), dest, {
        signal: ac.signal, compression,
        onProgress: (e) => {
          if (e.type !== 'progress' || ++progress !== 4) return
          midway = filesSync(out)
          ac.abort(reason)
        },
      })
      await expect(p).rejects.toBe(reason)
      // the abort came while blobs were being written
      expect(midway.some((f) => f.split('/').some((part) => part.startsWith('.tmp-')))).toBe(true)
      const left = await files(out)
      noTemps(left)
      expect(left.filter((f) => /[0-9a-f]{64}/.test(f))).toEqual([])
    }
  })

  it('uses a verified blob file when the source offers one', async () => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'src')))
    const inner = dir.parseReference(join(root, 'src'))
    const opened: string[] = []
    const withFiles = overrideSource(inner, (s) => ({
      getBlob: (info: BlobInfo, o?: { signal?: AbortSignal }) => { opened.push(info.digest!); return s.getBlob(info, o) },
      getVerifiedBlobPath: async (info: BlobInfo) => join(root, 'src', info.digest!.slice(7)),
    }))
    const r = await copyImage(withFiles, ociLayout.parseReference(`${join(root, 'layout')}:x`))
    expect(r).toMatchObject({ digest: image.manifestDigest, copied: 3 })
    expect(opened).toEqual([])
    // a layer that must be compressed is streamed instead (and verified)
    const plain = await writeRandomImage(dir.parseReference(join(root, 'src')), { compression: null, seed: 2 })
    const z = await copyImage(withFiles, ociLayout.parseReference(`${join(root, 'layout')}:z`), { compression: 'compress' })
    expect(opened.sort()).toEqual(plain.layers.map((l) => l.digest).sort())
    expect(z.digest).not.toBe(plain.manifestDigest)
    await verifyImage(ociLayout.parseReference(`${join(root, 'layout')}:z`))
  })

  it('copies signatures dir -> dir and refuses to drop them for oci: unless told to', async () => {
    const root = await tempDir()
    const image = await writeRandomImage(dir.parseReference(join(root, 'src')))
    await writeFile(join(root, 'src', 'signature-1'), 'first signature')
    await writeFile(join(root, 'src', 'signature-2'), 'second signature')
    const r = await copyImage(dir.parseReference(join(root, 'src')), dir.parseReference(join(root, 'dst')))
    expect(r.digest).toBe(image.manifestDigest)
    expect(await readFile(join(root, 'dst', 'signature-1'), 'utf8')).toBe('first signature')
    expect(await readFile(join(root, 'dst', 'signature-2'), 'utf8')).toBe('second signature')
    const layout = join(root, 'layout')
    await expect(copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:x`)))
      .rejects.toMatchObject({ code: 'SIGNATURES_UNSUPPORTED', message: expect.stringMatching(/remove-signatures/) })
    expect((await files(layout)).filter((f) => f.startsWith('blobs/sha256/'))).toEqual([])
    const ok = await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:x`), { removeSignatures: true })
    expect(ok.digest).toBe(image.manifestDigest)
  })
})

const skopeo = peer('skopeo')

describe.skipIf(!skopeo)('copyImage with skopeo', () => {
  it('writes layouts skopeo reads, and reads what skopeo writes', async () => {
    const root = await tempDir()
    await writeRandomImage(dir.parseReference(join(root, 'src')), { compression: null })
    const layout = join(root, 'layout')
    const r = await copyImage(dir.parseReference(join(root, 'src')), ociLayout.parseReference(`${layout}:gz`), { compression: 'compress' })
    expect((await skopeoInspectRaw(`oci:${layout}:gz`)).equals(r.manifest)).toBe(true)
    await skopeoOk(['copy', `oci:${layout}:gz`, `dir:${join(root, 'by-skopeo')}`])
    const back = await copyImage(dir.parseReference(join(root, 'by-skopeo')), ociLayout.parseReference(`${layout}:back`))
    expect(back.digest).toBe(r.digest)
    await verifyImage(ociLayout.parseReference(`${layout}:back`))
  })
})
