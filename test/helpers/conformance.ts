// The shared transport conformance suite (go-containerregistry's validate.Image): every
// transport test calls describeTransport(name, makeRef) in one line. It writes random images
// through the destination, reads them back through a source checking every digest, and checks
// the failure contracts: BLOB_UNKNOWN, DIGEST_INVALID/SIZE_INVALID with nothing kept, aborts
// rejecting with the signal's reason and leaving no `.tmp-` file, and an uncommitted close.
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable, type Transform, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { describe, expect, it, onTestFinished } from 'vitest'
import { decompressStream } from '../../src/compression.js'
import { type Digest, digestHex, digestOf, verifyDigest } from '../../src/digest.js'
import { manifestMediaTypeFor, parseManifest } from '../../src/manifest.js'
import type { ImageReference, ImageSource } from '../../src/types.js'
import { type RandomImage, buildRandomImage, putRandomImage, writeRandomImage, writeRandomIndex } from './random-image.js'

/** Options of {@link describeTransport}. */
export interface ConformanceOptions {
  /** Test image lists (skipped anyway when the destination refuses them). Default true. */
  lists?: boolean
  /** Manifest formats to write; each is skipped when the destination does not list it. Default both. */
  formats?: ('oci' | 'v2s2')[]
  /** Layer compressions to write. Default null, gzip and zstd. */
  compressions?: ('gzip' | 'zstd' | null)[]
}

/** A fresh temporary directory, removed when the current test finishes. */
/**
 * `inner` with its sources' methods replaced by what `wrap` returns for each opened source (the
 * rest forward to that source), so a test can watch or change one method of a real transport.
 */
export function overrideSource(inner: ImageReference, wrap: (source: ImageSource) => Partial<ImageSource>): ImageReference {
  return {
    transport: inner.transport,
    stringWithinTransport: () => inner.stringWithinTransport(),
    dockerReference: () => undefined,
    newImageDestination: (ctx) => inner.newImageDestination(ctx),
    deleteImage: (ctx) => inner.deleteImage(ctx),
    async newImageSource(ctx) {
      const s = await inner.newImageSource(ctx)
      return Object.assign(Object.create(s) as ImageSource, wrap(s))
    },
  }
}

export async function testDir(prefix = 'blobcache-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix))
  onTestFinished(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** Every path under `dir` (relative), recursively. */
export async function listTree(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true }).catch(() => [] as string[])
  return entries.map(String)
}

/** Paths under `dir` whose last component starts with `.tmp-`. */
export async function tempLeftovers(dir: string): Promise<string[]> {
  return (await listTree(dir)).filter((p) => p.split('/').pop()!.startsWith('.tmp-'))
}

/** Reads a whole stream, returning its bytes. */
export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  await pipeline(stream, new Writable({ write(c: Buffer, _e, cb) { chunks.push(c); cb() } }))
  return Buffer.concat(chunks)
}

/** Hashes a stream (sha256), after `transforms` if given, without keeping it. */
export async function streamDigest(stream: Readable, ...transforms: Transform[]): Promise<{ digest: Digest; size: number }> {
  const v = verifyDigest()
  await pipeline([stream, ...transforms, v, new Writable({ write(_c, _e, cb) { cb() } })])
  return { digest: v.digest, size: v.bytes }
}

/** A stream that never ends, producing 64 KiB every few milliseconds. */
export function slowStream(): Readable {
  let timer: NodeJS.Timeout | undefined
  return new Readable({
    read() {
      timer = setTimeout(() => this.push(Buffer.alloc(64 << 10, 7)), 5)
    },
    destroy(err, cb) {
      clearTimeout(timer)
      cb(err)
    },
  })
}

/**
 * `data` in 64 KiB chunks, aborting `controller` with `reason` once 40 chunks (2.5 MiB) have been
 * read: an abort in the middle of a write.
 */
export function abortingStream(data: Buffer, controller: AbortController, reason: Error): Readable {
  let sent = 0
  return new Readable({
    read() {
      if (sent === 40) controller.abort(reason)
      if (sent * 65_536 >= data.length) return void this.push(null)
      this.push(data.subarray(sent * 65_536, ++sent * 65_536))
    },
  })
}

async function withSource<T>(ref: ImageReference, fn: (src: ImageSource) => Promise<T>): Promise<T> {
  const src = await ref.newImageSource()
  try {
    return await fn(src)
  } finally {
    await src.close()
  }
}

/** Reads an image back through `src` and checks manifest bytes, config and every layer. */
export async function checkImage(src: ImageSource, image: RandomImage, instance?: Digest): Promise<void> {
  const got = await src.getManifest(instance)
  expect(got.bytes.equals(image.manifest)).toBe(true)
  expect(got.mediaType).toBe(image.mediaType)
  const parsed = parseManifest(got.bytes, got.mediaType)
  if (parsed.kind !== 'image') throw new Error('expected an image manifest')
  const config = await src.getBlob({ digest: image.configDigest, size: image.config.length })
  const configBytes = await readAll(config.stream)
  expect(config.size).toBe(image.config.length)
  expect(digestOf(configBytes)).toBe(image.configDigest)
  for (const [i, layer] of image.layers.entries()) {
    expect(parsed.manifest.layers[i].digest).toBe(layer.digest)
    const blob = await src.getBlob({ digest: layer.digest, size: layer.size, mediaType: layer.mediaType })
    expect(blob.size).toBe(layer.size)
    expect(await streamDigest(blob.stream)).toEqual({ digest: layer.digest, size: layer.size })
    const again = await src.getBlob({ digest: layer.digest, size: layer.size })
    const algorithm = layer.mediaType.endsWith('gzip') ? 'gzip' : layer.mediaType.endsWith('zstd') ? 'zstd' : null
    const tar = await streamDigest(again.stream, ...(algorithm ? [decompressStream(algorithm)] : []))
    expect(tar.digest).toBe(layer.diffID)
  }
}

/**
 * Declares the conformance suite for a transport. `makeRef(dir)` returns a reference placed
 * inside the fresh temporary directory `dir`; the suite asserts that no `.tmp-` file is left
 * anywhere under it. A missing image MUST read `MANIFEST_UNKNOWN`.
 */
export function describeTransport(
  name: string,
  makeRef: (dir: string) => ImageReference | Promise<ImageReference>,
  opts: ConformanceOptions = {},
): void {
  const formats = opts.formats ?? ['oci', 'v2s2']
  const compressions = opts.compressions ?? [null, 'gzip', 'zstd']
  const matrix = formats.flatMap((f) => compressions.filter((c) => !(f === 'v2s2' && c === 'zstd')).map((c) => [f, c] as const))

  const setup = async () => {
    const dir = await testDir(`blobcache-${name.replace(/[^a-z0-9]/gi, '')}-`)
    return { dir, ref: await makeRef(dir) }
  }
  const supports = async (ref: ImageReference, mediaType: string) => {
    const dest = await ref.newImageDestination()
    try {
      const types = dest.supportedManifestMIMETypes()
      return { format: types === undefined || types.includes(mediaType), lists: dest.acceptsImageLists() }
    } finally {
      await dest.close()
    }
  }

  describe(`transport conformance: ${name}`, () => {
    it.for(matrix)('writes a %s image with %s layers and reads it back', async ([format, compression], ctx) => {
      const { dir, ref } = await setup()
      if (!(await supports(ref, manifestMediaTypeFor(format))).format) ctx.skip()
      const image = await writeRandomImage(ref, { format, compression, layers: 3, layerSize: 40_000, seed: 7 })
      await withSource(ref, async (src) => {
        await checkImage(src, image)
        expect(await src.getSignatures()).toEqual([])
      })
      expect(await tempLeftovers(dir)).toEqual([])
    })

    it.skipIf(opts.lists === false)('writes a multi-platform index and reads every instance back', async (ctx) => {
      const { dir, ref } = await setup()
      if (!(await supports(ref, manifestMediaTypeFor('oci', true))).lists) ctx.skip()
      const platforms = [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64', variant: 'v8' }]
      const written = await writeRandomIndex(ref, platforms, { layers: 2 })
      await withSource(ref, async (src) => {
        const top = await src.getManifest()
        expect(top.bytes.equals(written.index)).toBe(true)
        expect(top.mediaType).toBe(written.mediaType)
        for (const image of written.images) await checkImage(src, image, image.manifestDigest)
      })
      expect(await tempLeftovers(dir)).toEqual([])
    })

    it('fails BLOB_UNKNOWN for a blob it does not hold', async () => {
      const { ref } = await setup()
      await writeRandomImage(ref, { layers: 1 })
      await withSource(ref, async (src) => {
        await expect(src.getBlob({ digest: digestOf('not stored'), size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
      })
    })

    it('computes the digest of a blob put without one, and reuses blobs it holds', async () => {
      const { dir, ref } = await setup()
      const dest = await ref.newImageDestination()
      try {
        const bytes = Buffer.from('a blob whose digest the caller does not know')
        const put = await dest.putBlob(Readable.from([bytes]), { size: -1 })
        expect(put).toMatchObject({ digest: digestOf(bytes), size: bytes.length })
        expect(await dest.tryReusingBlob({ digest: digestOf(bytes), size: bytes.length })).toMatchObject({ digest: digestOf(bytes), size: bytes.length })
        expect(await dest.tryReusingBlob({ digest: digestOf(bytes), size: bytes.length + 1 })).toBeUndefined()
        expect(await dest.tryReusingBlob({ digest: digestOf('absent'), size: -1 })).toBeUndefined()
        if (dest.putBlobFromFile) {
          const file = join(await testDir(), 'blob')
          const content = Buffer.from('a blob stored from a local file')
          await writeFile(file, content)
          const info = { digest: digestOf(content), size: content.length }
          expect(await dest.putBlobFromFile(file, info)).toMatchObject(info)
          expect(await dest.tryReusingBlob(info)).toMatchObject(info)
          await expect(dest.putBlobFromFile(file, { digest: digestOf('x'), size: 1 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
        }
      } finally {
        await dest.close()
      }
      expect(await tempLeftovers(dir)).toEqual([])
    })

    it('rejects DIGEST_INVALID and SIZE_INVALID and keeps nothing', async () => {
      const { dir, ref } = await setup()
      const dest = await ref.newImageDestination()
      const claimed = digestOf('what the caller promised')
      try {
        const wrong = Buffer.alloc(100_000, 1)
        await expect(dest.putBlob(Readable.from([wrong]), { digest: claimed, size: wrong.length })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
        await expect(dest.putBlob(Readable.from([wrong]), { digest: digestOf(wrong), size: 5 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
        await expect(dest.putBlob(Readable.from([wrong]), { digest: digestOf(wrong), size: wrong.length + 5 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
        expect(await dest.tryReusingBlob({ digest: claimed, size: -1 })).toBeUndefined()
        expect(await dest.tryReusingBlob({ digest: digestOf(wrong), size: -1 })).toBeUndefined()
        expect(await tempLeftovers(dir)).toEqual([])
      } finally {
        await dest.close()
      }
      const named = (await listTree(dir)).filter((p) => p.includes(digestHex(claimed)) || p.includes(digestHex(digestOf(Buffer.alloc(100_000, 1)))))
      expect(named).toEqual([])
    })

    it('rejects with the abort reason mid-stream and leaves no temporary file', async () => {
      const { dir, ref } = await setup()
      const dest = await ref.newImageDestination()
      try {
        const controller = new AbortController()
        const reason = new Error('stop the upload')
        setTimeout(() => controller.abort(reason), 60)
        const put = dest.putBlob(slowStream(), { digest: digestOf('never'), size: -1 }, { signal: controller.signal })
        await expect(put).rejects.toBe(reason)
        expect(await tempLeftovers(dir)).toEqual([])
        const already = AbortSignal.abort(new Error('aborted before the call'))
        await expect(dest.putBlob(Readable.from([Buffer.from('x')]), { size: -1 }, { signal: already })).rejects.toBe(already.reason)
      } finally {
        await dest.close()
      }
      expect(await tempLeftovers(dir)).toEqual([])
    })

    it('names nothing when a destination is closed without commit', async () => {
      const { dir, ref } = await setup()
      const image = await buildRandomImage({ layers: 2, seed: 99 })
      const dest = await ref.newImageDestination()
      try {
        await putRandomImage(dest, image)
      } finally {
        await dest.close()
      }
      await expect(withSource(ref, (src) => src.getManifest())).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
      const tree = await listTree(dir)
      expect(tree.filter((p) => p.split('/').pop()!.startsWith('.tmp-'))).toEqual([])
      expect(tree.filter((p) => [...image.blobs.keys()].some((d) => p.includes(digestHex(d))))).toEqual([])
    })
  })
}
