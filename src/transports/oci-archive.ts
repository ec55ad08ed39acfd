// "oci-archive:/file.tar[:name]": an OCI image layout in a tar file. Unlike containers/image,
// which extracts the archive into a temp dir first, the source reads index.json and each blob
// in place by range reads of the tar; the destination writes an `oci:` layout into a temp dir
// (delegating to oci-layout) and on commit streams it into the tar, renamed over the file.
import { createReadStream } from 'node:fs'
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { addAbortSignal } from 'node:stream'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestHex, digestOf, parseDigest } from '../digest.js'
import { DigestMismatchError, ImageError, errnoCode } from '../errors.js'
import { type Descriptor, MAX_MANIFEST_SIZE, checkDescriptor } from '../manifest.js'
import { guessMediaType, isManifestMediaType } from '../media-types.js'
import type { NamedReference } from '../name.js'
import { type TarIndex, type TarWriteEntry, openTarIndex, writeTarFile } from '../tar.js'
import type {
  BlobChunk, BlobInfo, CallOptions, ImageDestination, ImageReference, ImageSource, ImageTransport, LayerCompression,
  PutBlobOptions, SystemContext,
} from '../types.js'
import { OCI_REF_NAME, OciLayoutReference, splitOciReference, validateOciImageName } from './oci-layout.js'

const log = debug('blobcache:transports:oci-archive')

const MAX_INDEX_SIZE = 64 << 20

/** The `oci-archive` transport: `oci-archive:/file.tar[:name]`. */
export const ociArchive: ImageTransport = {
  name: 'oci-archive',
  parseReference(s: string) {
    const { path, image } = splitOciReference(s)
    return new OciArchiveReference(path, image)
  },
}

/** One image (by `org.opencontainers.image.ref.name`, or the only one) in an OCI archive. */
export class OciArchiveReference implements ImageReference {
  readonly transport = ociArchive

  /** `image` is the ref.name annotation, '' for none. Throws `REFERENCE_INVALID`. */
  constructor(readonly file: string, readonly image = '') {
    if (file === '' || file.includes(':')) throw new ImageError('REFERENCE_INVALID', `invalid oci-archive path ${JSON.stringify(file)}`)
    validateOciImageName(image)
  }

  stringWithinTransport(): string {
    return this.image ? `${this.file}:${this.image}` : this.file
  }

  /** Always undefined, as in containers/image. */
  dockerReference(): NamedReference | undefined {
    return undefined
  }

  async newImageSource(ctx: SystemContext = {}): Promise<ImageSource> {
    const index = await openTarIndex(this.file, { signal: ctx.signal }).catch((err) => {
      if (errnoCode(err) === 'ENOENT') throw new ImageError('MANIFEST_UNKNOWN', `oci-archive:${this.file}: no such archive`, { cause: err })
      throw err
    })
    const top = chooseEntry(this, await index.readFile('index.json', { notFoundCode: 'MANIFEST_UNKNOWN', maxBytes: MAX_INDEX_SIZE, signal: ctx.signal }))
    log('opened %s: %s, %d tar entries', this.file, top.entry.digest, index.entries.size)
    return new OciArchiveSource(this, index, top.entry, top.all)
  }

  /** Stages an OCI layout in `ctx.tmpDir` (default `os.tmpdir()`); commit replaces the archive. */
  async newImageDestination(ctx: SystemContext = {}): Promise<ImageDestination> {
    ctx.signal?.throwIfAborted()
    const existing = await stat(this.file).catch((err) => (errnoCode(err) === 'ENOENT' ? undefined : Promise.reject(err)))
    if (existing && !existing.isFile()) throw new ImageError('UNSUPPORTED', `oci-archive:${this.file}: not a regular file`)
    const staging = await mkdtemp(join(ctx.tmpDir ?? tmpdir(), 'blobcache-oci-archive-'))
    try {
      const inner = await new OciLayoutReference(staging, this.image, { durable: false }).newImageDestination(ctx)
      return new OciArchiveDestination(this, staging, inner)
    } catch (err) {
      await rm(staging, { recursive: true, force: true })
      throw err
    }
  }

  async deleteImage(): Promise<void> {
    throw new ImageError('UNSUPPORTED', 'deleting images is not supported by oci-archive')
  }
}

/** Picks the index.json entry as `oci:` does: by ref.name, or the only entry. */
function chooseEntry(ref: OciArchiveReference, bytes: Buffer): { entry: Descriptor; all: Record<string, unknown>[] } {
  const where = `oci-archive:${ref.file}`
  let doc: { manifests?: unknown } | null
  try {
    doc = JSON.parse(bytes.toString('utf8')) as { manifests?: unknown } | null
  } catch (err) {
    throw new ImageError('LAYOUT_INVALID', `${where}: index.json is not JSON`, { cause: err })
  }
  const all = doc?.manifests
  if (!Array.isArray(all) || all.some((e) => typeof e !== 'object' || e === null || Array.isArray(e))) {
    throw new ImageError('LAYOUT_INVALID', `${where}: index.json needs a manifests array of objects`)
  }
  const refName = (e: Record<string, unknown>) => (e.annotations as Record<string, unknown> | undefined)?.[OCI_REF_NAME]
  let position: number
  if (ref.image) {
    position = all.findIndex((e) => refName(e) === ref.image)
    if (position < 0) throw new ImageError('MANIFEST_UNKNOWN', `no image named ${JSON.stringify(ref.image)} in ${where}`)
  } else if (all.length === 1) position = 0
  else {
    const names = all.map(refName).filter((n) => typeof n === 'string').join(', ') || 'none'
    throw new ImageError('MANIFEST_UNKNOWN', all.length === 0 ? `${where} holds no image` : `${where} holds ${all.length} images; choose one as ${where}:NAME (names: ${names})`)
  }
  const entry = checkDescriptor(all[position], `${where} index.json manifests[${position}]`)
  if (!isManifestMediaType(entry.mediaType)) throw new ImageError('UNSUPPORTED', `${where}: entry ${position} has unsupported media type ${entry.mediaType}`)
  return { entry, all }
}

const blobPath = (d: Digest) => `blobs/${digestAlgorithm(d)}/${digestHex(d)}`

function requireDigest(info: BlobInfo): Digest {
  if (info.digest === undefined) throw new ImageError('DIGEST_INVALID', 'a blob digest is required')
  return parseDigest(info.digest)
}

/** Serves manifests and blobs straight from the tar: each blob is a range of the archive file. */
class OciArchiveSource implements ImageSource {
  constructor(
    readonly reference: OciArchiveReference,
    private readonly index: TarIndex,
    private readonly top: Descriptor,
    private readonly entries: Record<string, unknown>[],
  ) {}

  async getManifest(instanceDigest?: Digest, opts: CallOptions = {}): Promise<{ bytes: Buffer; mediaType: string }> {
    const digest = instanceDigest === undefined ? this.top.digest : parseDigest(instanceDigest)
    const bytes = await this.index.readFile(blobPath(digest), { notFoundCode: 'MANIFEST_UNKNOWN', maxBytes: MAX_MANIFEST_SIZE, signal: opts.signal })
    const actual = digestOf(bytes, digestAlgorithm(digest))
    if (actual !== digest) throw new DigestMismatchError(digest, actual)
    if (instanceDigest === undefined) return { bytes, mediaType: this.top.mediaType }
    const entry = this.entries.find((e) => e.digest === digest)
    return { bytes, mediaType: guessMediaType(bytes) || (typeof entry?.mediaType === 'string' ? entry.mediaType : '') }
  }

  async getBlob(info: BlobInfo, opts: CallOptions = {}): Promise<{ stream: Readable; size: number }> {
    opts.signal?.throwIfAborted()
    const digest = requireDigest(info)
    const entry = this.index.resolve(blobPath(digest))
    const stream = this.index.open(blobPath(digest), { notFoundCode: 'BLOB_UNKNOWN' })
    if (opts.signal) addAbortSignal(opts.signal, stream)
    log('get blob %s', digest)
    return { stream, size: entry!.size }
  }

  async *getBlobAt(info: BlobInfo, chunks: BlobChunk[], opts: CallOptions = {}): AsyncIterable<Readable> {
    const path = blobPath(requireDigest(info))
    for (const c of chunks) {
      opts.signal?.throwIfAborted()
      yield this.index.open(path, { notFoundCode: 'BLOB_UNKNOWN', start: c.offset, length: c.length })
    }
  }

  /** An OCI archive stores no signatures. */
  async getSignatures(): Promise<Buffer[]> {
    return []
  }

  async close(): Promise<void> {}
}

/** An `oci:` destination in a temp dir; commit() packs it into the archive file. */
class OciArchiveDestination implements ImageDestination {
  putBlobFromFile?: (path: string, info: BlobInfo, opts?: PutBlobOptions) => Promise<BlobInfo>

  constructor(
    readonly reference: OciArchiveReference,
    private readonly staging: string,
    private readonly inner: ImageDestination,
  ) {
    if (inner.putBlobFromFile) this.putBlobFromFile = (path, info, opts) => inner.putBlobFromFile!(path, info, opts)
  }

  supportedManifestMIMETypes(): string[] | undefined {
    return this.inner.supportedManifestMIMETypes()
  }

  desiredLayerCompression(): LayerCompression {
    return this.inner.desiredLayerCompression()
  }

  acceptsImageLists(): boolean {
    return this.inner.acceptsImageLists()
  }

  putBlob(stream: Readable, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    return this.inner.putBlob(stream, info, opts)
  }

  tryReusingBlob(info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo | undefined> {
    return this.inner.tryReusingBlob(info, opts)
  }

  putManifest(bytes: Buffer, instanceDigest?: Digest, opts?: CallOptions): Promise<void> {
    return this.inner.putManifest(bytes, instanceDigest, opts)
  }

  /**
   * Commits the staged layout, then writes `oci-layout`, `index.json`, `blobs/`, `blobs/<alg>/`
   * and every blob (sorted, so the archive is deterministic) to a `.tmp-` file beside the
   * archive and renames it over the archive, replacing any archive there (as containers/image).
   */
  async commit(opts: CallOptions = {}): Promise<void> {
    await this.inner.commit(opts)
    const root = this.staging
    const entries: TarWriteEntry[] = []
    const file = (path: string, size: number): TarWriteEntry =>
      ({ path, size, open: () => createReadStream(join(root, path), { highWaterMark: 1 << 20 }) })
    for (const name of ['oci-layout', 'index.json']) entries.push(file(name, (await stat(join(root, name))).size))
    entries.push({ path: 'blobs', type: 'dir' })
    for (const alg of (await readdir(join(root, 'blobs'))).sort()) {
      entries.push({ path: `blobs/${alg}`, type: 'dir' })
      for (const hex of (await readdir(join(root, 'blobs', alg))).sort()) {
        if (hex.startsWith('.tmp-')) continue
        const path = `blobs/${alg}/${hex}`
        entries.push(file(path, (await stat(join(root, path))).size))
      }
    }
    await writeTarFile(this.reference.file, entries, { signal: opts.signal })
    log('committed %s: %d entries', this.reference.file, entries.length)
  }

  async close(): Promise<void> {
    try {
      await this.inner.close()
    } finally {
      await rm(this.staging, { recursive: true, force: true })
    }
  }
}
