// dir:/path: one image per directory, byte-compatible with containers/image's directory
// transport (skopeo `dir:`): a `version` file, one file per blob named by the digest's hex
// (for every algorithm, as containers/image does), `manifest.json`, `<hex>.manifest.json` for
// the instances of a list, and signatures as `signature-N` / `<hex>.signature-N`.
import { mkdir, readdir, readFile, rm, stat } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import type { Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestHex, digestOf, parseDigest } from '../digest.js'
import { DigestMismatchError, ImageError, errnoCode } from '../errors.js'
import { guessMediaType } from '../media-types.js'
import type {
  BlobInfo, CallOptions, ImageDestination, ImageReference, ImageSource, ImageTransport, LayerCompression, PutBlobOptions,
  SystemContext,
} from '../types.js'
import { type StoredBlob, copyBlob, fileSize, openBlob, readSmallFile, writeBlob, writeFileAtomic } from './fs-util.js'
import { slabTaker } from '../io/hash-thread.js'

const log = debug('blobcache:transports:dir')

/** The exact content of the `version` file containers/image writes and expects. */
export const DIR_VERSION = 'Directory Transport Version: 1.1\n'

/** The `dir:` transport: `dir:/path/to/directory`. */
export const dir: ImageTransport = {
  name: 'dir',
  parseReference: (s: string) => new DirReference(s),
}

/** A `dir:` image: the directory path as given (relative paths resolve against the cwd at parse time). */
export class DirReference implements ImageReference {
  readonly transport: ImageTransport = dir
  /** The absolute path used for all I/O. */
  readonly resolvedPath: string

  /** Throws `REFERENCE_INVALID` for an empty path. */
  constructor(readonly path: string) {
    if (path === '') throw new ImageError('REFERENCE_INVALID', 'dir: reference needs a directory path')
    this.resolvedPath = resolve(path)
  }

  stringWithinTransport(): string {
    return this.path
  }

  /** Always undefined: a directory carries no docker reference (as in containers/image). */
  dockerReference(): undefined {
    return undefined
  }

  async newImageSource(_ctx?: SystemContext): Promise<ImageSource> {
    return new DirSource(this)
  }

  async newImageDestination(ctx?: SystemContext): Promise<ImageDestination> {
    await prepareDirectory(this.resolvedPath, ctx)
    return new DirDestination(this)
  }

  /** Not supported, as in containers/image: fails `UNSUPPORTED`; remove the directory instead. */
  async deleteImage(_ctx?: SystemContext): Promise<void> {
    throw new ImageError('UNSUPPORTED', `deleting images is not supported for dir:${this.path}; remove the directory`)
  }

  /** The file of a blob; the digest is validated before it becomes a path. */
  blobPath(digest: Digest): string {
    return join(this.resolvedPath, digestHex(parseDigest(digest)))
  }

  /** `manifest.json`, or `<hex>.manifest.json` for an instance of a list. */
  manifestPath(instance?: Digest): string {
    return join(this.resolvedPath, instance ? `${digestHex(parseDigest(instance))}.manifest.json` : 'manifest.json')
  }

  /** `signature-<n>` (1-based), or `<hex>.signature-<n>` for an instance. */
  signaturePath(n: number, instance?: Digest): string {
    return join(this.resolvedPath, instance ? `${digestHex(parseDigest(instance))}.signature-${n}` : `signature-${n}`)
  }
}

/**
 * Makes `path` ready for a new image, as containers/image does: create it if missing; if it
 * holds anything, it MUST be a dir-transport directory (exact `version` file), whose contents
 * are then removed so that it holds one image. Anything else fails `LAYOUT_INVALID`.
 */
async function prepareDirectory(path: string, ctx?: SystemContext): Promise<void> {
  ctx?.signal?.throwIfAborted()
  let entries: string[] | undefined
  try {
    entries = await readdir(path)
  } catch (err) {
    if (errnoCode(err) === 'ENOTDIR') throw new ImageError('LAYOUT_INVALID', `dir:${path} is not a directory`, { cause: err })
    if (errnoCode(err) !== 'ENOENT') throw err
  }
  if (entries === undefined) {
    await mkdir(path, { recursive: true })
  } else if (entries.length > 0) {
    const version = await readFile(join(path, 'version'), 'utf8').catch(() => undefined)
    if (version !== DIR_VERSION) {
      throw new ImageError('LAYOUT_INVALID', `${path} is not empty and not a dir: image directory; refusing to overwrite it`)
    }
    log('overwriting image directory %s', path)
    await Promise.all(entries.map((e) => rm(join(path, e), { recursive: true, force: true })))
  }
  await writeFileAtomic(join(path, 'version'), DIR_VERSION)
}

function requireDigest(info: BlobInfo): Digest {
  if (info.digest === undefined) throw new ImageError('DIGEST_INVALID', 'a blob digest is required')
  return parseDigest(info.digest)
}

class DirSource implements ImageSource {
  constructor(readonly reference: DirReference) {}

  async getManifest(instanceDigest?: Digest, opts?: CallOptions): Promise<{ bytes: Buffer; mediaType: string }> {
    const path = this.reference.manifestPath(instanceDigest)
    const what = `manifest${instanceDigest ? ` ${instanceDigest}` : ''} in dir:${this.reference.path}`
    const bytes = await readSmallFile(path, what, 'MANIFEST_UNKNOWN', opts)
    return { bytes, mediaType: guessMediaType(bytes) }
  }

  async getBlob(info: BlobInfo, opts?: CallOptions): Promise<{ stream: Readable; size: number }> {
    const digest = requireDigest(info)
    log('get blob %s', digest)
    return openBlob(this.reference.blobPath(digest), digest, opts)
  }

  /** The blob's file, when it is a regular file; its bytes are not verified here. */
  async getLocalBlobPath(info: BlobInfo): Promise<string | undefined> {
    const path = this.reference.blobPath(requireDigest(info))
    return (await fileSize(path)) === undefined ? undefined : path
  }

  async getSignatures(instanceDigest?: Digest, opts?: CallOptions): Promise<Buffer[]> {
    const out: Buffer[] = []
    for (let n = 1; ; n++) {
      opts?.signal?.throwIfAborted()
      try {
        out.push(await readFile(this.reference.signaturePath(n, instanceDigest)))
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return out
        throw err
      }
    }
  }

  async close(): Promise<void> {}
}

/**
 * Writes one image into its directory. Blobs are verified and renamed into place as they
 * arrive; manifests and signatures are held until commit(), which writes them (the top-level
 * `manifest.json` last). Closing without commit removes the blobs this destination wrote.
 */
class DirDestination implements ImageDestination {
  /** putBlob writes each chunk to a blob file and keeps none (see slabLender). */
  readonly [slabTaker] = true

  readonly #manifests = new Map<string, Buffer>()
  readonly #signatures = new Map<string, { instance?: Digest; signatures: Buffer[] }>()
  readonly #created = new Set<string>()
  #committed = false

  constructor(readonly reference: DirReference) {}

  /** putBlobFromFile hard-links a plain 0644 file from this directory's file system. */
  get linkDirectory(): string {
    return this.reference.resolvedPath
  }

  supportedManifestMIMETypes(): undefined {
    return undefined
  }

  desiredLayerCompression(): LayerCompression {
    return 'preserve'
  }

  acceptsImageLists(): boolean {
    return true
  }

  async putBlob(stream: Readable, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    const expected = info.digest === undefined ? undefined : parseDigest(info.digest)
    const stored = await writeBlob(stream, this.reference.resolvedPath, (d) => this.reference.blobPath(d), {
      expected, size: info.size, signal: opts?.signal,
    })
    return this.#stored(info, stored)
  }

  async putBlobFromFile(path: string, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    const expected = info.digest === undefined ? undefined : parseDigest(info.digest)
    const stored = await copyBlob(path, this.reference.resolvedPath, (d) => this.reference.blobPath(d), {
      expected, size: info.size, signal: opts?.signal,
    })
    return this.#stored(info, stored)
  }

  #stored(info: BlobInfo, stored: StoredBlob): BlobInfo {
    if (stored.created) this.#created.add(stored.path)
    return { ...info, digest: stored.digest, size: stored.size }
  }

  async tryReusingBlob(info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo | undefined> {
    opts?.signal?.throwIfAborted()
    if (info.digest === undefined) return undefined
    const digest = parseDigest(info.digest)
    const size = await fileSize(this.reference.blobPath(digest))
    if (size === undefined || (info.size >= 0 && size !== info.size)) return undefined
    log('reusing blob %s', digest)
    return { ...info, digest, size }
  }

  async putManifest(bytes: Buffer, instanceDigest?: Digest, opts?: CallOptions): Promise<void> {
    opts?.signal?.throwIfAborted()
    if (instanceDigest !== undefined) {
      const actual = digestOf(bytes, digestAlgorithm(parseDigest(instanceDigest)))
      if (actual !== instanceDigest) throw new DigestMismatchError(instanceDigest, actual)
    }
    this.#manifests.set(this.reference.manifestPath(instanceDigest), Buffer.from(bytes))
  }

  async putSignatures(signatures: Buffer[], instanceDigest?: Digest, opts?: CallOptions): Promise<void> {
    opts?.signal?.throwIfAborted()
    if (instanceDigest !== undefined) parseDigest(instanceDigest)
    this.#signatures.set(instanceDigest ?? '', { instance: instanceDigest, signatures: signatures.map((s) => Buffer.from(s)) })
  }

  async commit(opts?: CallOptions): Promise<void> {
    const top = this.reference.manifestPath()
    for (const { instance, signatures } of this.#signatures.values()) {
      for (let i = 0; i < signatures.length; i++) {
        opts?.signal?.throwIfAborted()
        await writeFileAtomic(this.reference.signaturePath(i + 1, instance), signatures[i])
      }
      // a second putSignatures with fewer entries must not leave older ones readable
      for (let n = signatures.length + 1; ; n++) {
        const path = this.reference.signaturePath(n, instance)
        if ((await stat(path).catch(() => undefined)) === undefined) break
        await rm(path, { force: true })
      }
    }
    const ordered = [...this.#manifests].sort(([a], [b]) => Number(a === top) - Number(b === top))
    for (const [path, bytes] of ordered) {
      opts?.signal?.throwIfAborted()
      await writeFileAtomic(path, bytes)
    }
    this.#committed = true
    log('committed dir:%s', this.reference.path)
  }

  async close(): Promise<void> {
    if (this.#committed || this.#created.size === 0) return
    log('closing uncommitted dir:%s: removing %d blobs', this.reference.path, this.#created.size)
    await Promise.all([...this.#created].map((p) => rm(p, { force: true })))
    this.#created.clear()
  }
}
