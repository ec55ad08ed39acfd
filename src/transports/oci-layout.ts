// oci:/path[:name]: an OCI image layout directory (`oci-layout`, `index.json`,
// `blobs/<alg>/<hex>`), read and written the way containers/image's `oci:` transport does.
//
// API for other modules (the archive transports delegate here):
// - `ociLayout`: the transport, name `oci`. `parseReference('/dir:name')` splits at the FIRST
//   colon, as containers/image does on Unix: the path may not contain one, and the name (the
//   `org.opencontainers.image.ref.name` annotation, e.g. `latest` or
//   `docker.io/library/alpine:3.19`) may. An empty name means "the only image" when reading and
//   "an unnamed entry" when writing.
// - `new OciLayoutReference(dir, image?)`: the same without parsing; throws REFERENCE_INVALID.
//   Its destination creates the directory if missing, writes blobs through `.tmp-` files,
//   and on commit() replaces `index.json` atomically (entry of the same name loses the name).
//   `deleteImage()` drops the entry and the blobs no other entry references.
// - `splitOciReference(s)` and `validateOciImageName(name)`: the reference syntax, for
//   `oci-archive:/file.tar:name`.
// - `readLayoutIndex(dir)`: index.json, every entry validated. `initLayout(dir)`: an empty layout.
// - `withLayoutLock(dir, fn)`: serialises index.json updates, within this process and across
//   processes (the lock file `index.json.lock`, as ImageCache uses).
import { rm, stat } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestHex, digestOf, parseDigest } from '../digest.js'
import { DigestMismatchError, ImageError, errnoCode } from '../errors.js'
import { withFileLock } from '../file-lock.js'
import { type Descriptor, type ImageIndex, checkDescriptor, parseManifest } from '../manifest.js'
import { MediaType, guessMediaType, isManifestMediaType } from '../media-types.js'
import type {
  BlobInfo, CallOptions, ImageDestination, ImageReference, ImageSource, ImageTransport, LayerCompression, PutBlobOptions,
  SystemContext,
} from '../types.js'
import {
  type StoredBlob, copyBlob, ensureDir, fileSize, openBlob, readSmallFile, writeBlob, writeFileAtomic,
} from './fs-util.js'
import { slabTaker } from '../io/hash-thread.js'

const log = debug('blobcache:transports:oci-layout')

/** The annotation that names an image in `index.json`. */
export const OCI_REF_NAME = 'org.opencontainers.image.ref.name'
/** The content of the `oci-layout` file. */
export const OCI_LAYOUT_FILE = JSON.stringify({ imageLayoutVersion: '1.0.0' })
const MAX_INDEX_SIZE = 64 << 20

// containers/image's oci reference-name grammar: components of alphanumerics joined by
// `-._:@+` or `--`, separated by `/`.
const COMPONENT = '[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*'
const IMAGE_NAME_RE = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`)

/** Throws `REFERENCE_INVALID` unless `name` is empty or a valid oci reference name. */
export function validateOciImageName(name: string): void {
  if (name !== '' && !IMAGE_NAME_RE.test(name)) throw new ImageError('REFERENCE_INVALID', `invalid oci image name ${JSON.stringify(name)}`)
}

/** Splits `path[:name]` at the first colon and validates both parts. Throws `REFERENCE_INVALID`. */
export function splitOciReference(s: string): { path: string; image: string } {
  const at = s.indexOf(':')
  const path = at < 0 ? s : s.slice(0, at)
  const image = at < 0 ? '' : s.slice(at + 1)
  if (path === '') throw new ImageError('REFERENCE_INVALID', `invalid oci reference ${JSON.stringify(s)}: the path is empty`)
  validateOciImageName(image)
  return { path, image }
}

/** The `oci:` transport: `oci:/path/to/layout[:name]`. */
export const ociLayout: ImageTransport = {
  name: 'oci',
  parseReference(s: string) {
    const { path, image } = splitOciReference(s)
    return new OciLayoutReference(path, image)
  },
}

/** One image (by name, or the only one) in an OCI layout directory. */
export class OciLayoutReference implements ImageReference {
  readonly transport: ImageTransport = ociLayout
  /** The absolute directory used for all I/O. */
  readonly resolvedDir: string

  /**
   * `image` is the ref.name annotation, '' for none. Throws `REFERENCE_INVALID`. With
   * `durable: false` blobs are not synced to disk before they are named: for a staging layout
   * that is packed into an archive (which is synced) and then thrown away. Default true.
   */
  constructor(readonly dir: string, readonly image = '', readonly options: { durable?: boolean } = {}) {
    if (dir === '' || dir.includes(':')) throw new ImageError('REFERENCE_INVALID', `invalid oci layout path ${JSON.stringify(dir)}`)
    validateOciImageName(image)
    this.resolvedDir = resolve(dir)
  }

  stringWithinTransport(): string {
    return this.image ? `${this.dir}:${this.image}` : this.dir
  }

  /** Always undefined, as in containers/image. */
  dockerReference(): undefined {
    return undefined
  }

  /** The path of a blob; the digest is validated before it becomes a path. */
  blobPath(digest: Digest): string {
    const d = parseDigest(digest)
    return join(this.resolvedDir, 'blobs', digestAlgorithm(d), digestHex(d))
  }

  async newImageSource(ctx?: SystemContext): Promise<ImageSource> {
    const index = await readIndexFile(this.resolvedDir, ctx)
    const { descriptor } = findEntry(index, this)
    return new OciLayoutSource(this, descriptor, index)
  }

  async newImageDestination(ctx?: SystemContext): Promise<ImageDestination> {
    ctx?.signal?.throwIfAborted()
    await checkLayoutFile(this.resolvedDir)
    await ensureDir(join(this.resolvedDir, 'blobs'))
    return new OciLayoutDestination(this)
  }

  /**
   * Removes the entry from index.json (atomically), then deletes the blobs that no remaining
   * entry references (walking manifests and indexes), keeping blobs held by open destinations
   * of this process. Fails before changing anything if a remaining entry is invalid.
   */
  async deleteImage(ctx?: SystemContext): Promise<void> {
    await withLayoutLock(this.resolvedDir, async () => {
      const index = await readIndexFile(this.resolvedDir, ctx)
      const { descriptor, position } = findEntry(index, this)
      const remaining = index.manifests.filter((_, i) => i !== position)
      const keep = await referencedBlobs(this, remaining.map((d, i) => checkDescriptor(d, `index.json manifests[${i}]`)), ctx)
      const drop = await referencedBlobs(this, [descriptor], ctx)
      await writeFileAtomic(join(this.resolvedDir, 'index.json'), JSON.stringify({ ...index, manifests: remaining }))
      let removed = 0
      for (const digest of drop) {
        const path = this.blobPath(digest)
        if (keep.has(digest) || claims.has(path)) continue
        await rm(path, { force: true })
        removed++
      }
      log('deleted %s from %s: %d blobs removed', descriptor.digest, this.dir, removed)
    })
  }
}

// ---------------------------------------------------------------------------------------------
// index.json

/** index.json as stored: entries are kept verbatim and validated only when used. */
interface RawIndex {
  schemaVersion?: unknown
  manifests: Record<string, unknown>[]
  [key: string]: unknown
}

function layoutInvalid(dir: string, msg: string, cause?: unknown): ImageError {
  return new ImageError('LAYOUT_INVALID', `invalid OCI layout ${dir}: ${msg}`, cause === undefined ? undefined : { cause })
}

async function readIndexFile(dir: string, opts?: CallOptions): Promise<RawIndex> {
  const bytes = await readSmallFile(join(dir, 'index.json'), `OCI layout ${dir}: index.json`, 'MANIFEST_UNKNOWN', {
    ...opts, max: MAX_INDEX_SIZE, tooLarge: 'LAYOUT_INVALID',
  })
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw layoutInvalid(dir, 'index.json is not JSON', err)
  }
  const m = (doc ?? {}) as Record<string, unknown>
  if (typeof doc !== 'object' || Array.isArray(doc) || !Array.isArray(m.manifests)) {
    throw layoutInvalid(dir, 'index.json needs a manifests array')
  }
  if (m.manifests.some((e) => typeof e !== 'object' || e === null || Array.isArray(e))) {
    throw layoutInvalid(dir, 'index.json has an entry that is not an object')
  }
  return m as RawIndex
}

const refName = (entry: Record<string, unknown>): unknown => (entry.annotations as Record<string, unknown> | undefined)?.[OCI_REF_NAME]

/** Finds the entry a reference names; MANIFEST_UNKNOWN when none (or, unnamed, not exactly one). */
function findEntry(index: RawIndex, ref: OciLayoutReference): { descriptor: Descriptor; position: number } {
  const where = `oci:${ref.dir}`
  let position: number
  if (ref.image) {
    position = index.manifests.findIndex((e) => refName(e) === ref.image)
    if (position < 0) throw new ImageError('MANIFEST_UNKNOWN', `no image named ${JSON.stringify(ref.image)} in ${where}`)
  } else if (index.manifests.length === 1) {
    position = 0
  } else {
    const names = index.manifests.map(refName).filter((n) => typeof n === 'string')
    throw new ImageError(
      'MANIFEST_UNKNOWN',
      index.manifests.length === 0
        ? `${where} holds no image`
        : `${where} holds ${index.manifests.length} images; choose one as ${where}:NAME (names: ${names.join(', ') || 'none'})`,
    )
  }
  const descriptor = checkDescriptor(index.manifests[position], `${where} index.json manifests[${position}]`)
  if (!isManifestMediaType(descriptor.mediaType)) {
    throw new ImageError('UNSUPPORTED', `${where}: entry ${position} has unsupported media type ${descriptor.mediaType}`)
  }
  return { descriptor, position }
}

/** Reads index.json of a layout with every entry validated (`MANIFEST_INVALID` for a bad one). */
export async function readLayoutIndex(dir: string, opts?: CallOptions): Promise<ImageIndex> {
  const raw = await readIndexFile(resolve(dir), opts)
  raw.manifests.forEach((d, i) => checkDescriptor(d, `index.json manifests[${i}]`))
  return { ...raw, schemaVersion: 2, manifests: raw.manifests as unknown as Descriptor[] }
}

/** Creates an empty layout at `dir` (directory, `blobs/`, `oci-layout`, `index.json`) where missing. */
export async function initLayout(dir: string): Promise<void> {
  const root = resolve(dir)
  await checkLayoutFile(root)
  await ensureDir(join(root, 'blobs'))
  await withLayoutLock(root, async () => {
    if ((await fileSize(join(root, 'oci-layout'))) === undefined) await writeFileAtomic(join(root, 'oci-layout'), OCI_LAYOUT_FILE)
    if ((await fileSize(join(root, 'index.json'))) === undefined) await writeFileAtomic(join(root, 'index.json'), emptyIndex())
  })
}

function emptyIndex(): string {
  return JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [] })
}

/** An existing `oci-layout` file MUST name a 1.x layout; anything else fails `LAYOUT_INVALID`. */
async function checkLayoutFile(dir: string): Promise<void> {
  let bytes: Buffer
  try {
    bytes = await readSmallFile(join(dir, 'oci-layout'), 'oci-layout', 'MANIFEST_UNKNOWN', { max: 1 << 16, tooLarge: 'LAYOUT_INVALID' })
  } catch (err) {
    if ((err as ImageError).code === 'MANIFEST_UNKNOWN') return
    if (errnoCode(err) === 'ENOTDIR') throw layoutInvalid(dir, 'not a directory', err)
    throw err
  }
  let version: unknown
  try {
    version = (JSON.parse(bytes.toString('utf8')) as Record<string, unknown>).imageLayoutVersion
  } catch (err) {
    throw layoutInvalid(dir, 'oci-layout is not JSON', err)
  }
  if (typeof version !== 'string' || !/^1\.\d+\.\d+$/.test(version)) throw layoutInvalid(dir, `unsupported imageLayoutVersion ${JSON.stringify(version)}`)
}

const locks = new Map<string, Promise<unknown>>()

/** The lock file serialising index.json updates across processes (the one ImageCache takes too). */
const LAYOUT_LOCK_FILE = 'index.json.lock'

/**
 * Runs `fn` after every earlier call for the same layout directory (in this process) settled,
 * holding the layout's cross-process lock file while it runs: two processes committing to one
 * layout MUST NOT lose each other's index.json entries. A directory that does not exist yet has
 * nothing to guard, so `fn` then runs under the in-process lock only.
 */
export async function withLayoutLock<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const key = resolve(dir)
  const previous = locks.get(key) ?? Promise.resolve()
  const locked = async () => ((await stat(key).then((s) => s.isDirectory(), () => false)) ? withFileLock(join(key, LAYOUT_LOCK_FILE), fn) : fn())
  const run = previous.catch(() => undefined).then(locked)
  const settled = run.catch(() => undefined)
  locks.set(key, settled)
  try {
    return await run
  } finally {
    if (locks.get(key) === settled) locks.delete(key)
  }
}

/**
 * Every digest reachable from `roots`: the roots, and for manifests their config and layers,
 * for indexes their entries, recursively. A manifest blob that is missing counts as itself only.
 */
async function referencedBlobs(ref: OciLayoutReference, roots: Descriptor[], opts?: CallOptions): Promise<Set<Digest>> {
  const seen = new Set<Digest>()
  const visit = async (d: Descriptor): Promise<void> => {
    if (seen.has(d.digest)) return
    seen.add(d.digest)
    if (!isManifestMediaType(d.mediaType)) return
    let bytes: Buffer
    try {
      bytes = await readSmallFile(ref.blobPath(d.digest), `manifest ${d.digest}`, 'MANIFEST_UNKNOWN', opts)
    } catch (err) {
      if ((err as ImageError).code === 'MANIFEST_UNKNOWN') return
      throw err
    }
    const parsed = parseManifest(bytes, d.mediaType)
    if (parsed.kind === 'index') {
      for (const child of parsed.index.manifests) await visit(child)
    } else {
      seen.add(parsed.manifest.config.digest)
      for (const layer of parsed.manifest.layers) seen.add(layer.digest)
    }
  }
  for (const root of roots) await visit(root)
  return seen
}

// ---------------------------------------------------------------------------------------------
// Source

function requireDigest(info: BlobInfo): Digest {
  if (info.digest === undefined) throw new ImageError('DIGEST_INVALID', 'a blob digest is required')
  return parseDigest(info.digest)
}

class OciLayoutSource implements ImageSource {
  constructor(
    readonly reference: OciLayoutReference,
    readonly descriptor: Descriptor,
    readonly index: RawIndex,
  ) {}

  /** Reads a manifest blob and checks that it hashes to its digest (it is small). */
  async getManifest(instanceDigest?: Digest, opts?: CallOptions): Promise<{ bytes: Buffer; mediaType: string }> {
    const digest = instanceDigest === undefined ? this.descriptor.digest : parseDigest(instanceDigest)
    const bytes = await readSmallFile(this.reference.blobPath(digest), `manifest ${digest} in oci:${this.reference.dir}`, 'MANIFEST_UNKNOWN', opts)
    const actual = digestOf(bytes, digestAlgorithm(digest))
    if (actual !== digest) throw new DigestMismatchError(digest, actual)
    if (instanceDigest === undefined) return { bytes, mediaType: this.descriptor.mediaType }
    const entry = this.index.manifests.find((e) => e.digest === digest)
    return { bytes, mediaType: guessMediaType(bytes) || (typeof entry?.mediaType === 'string' ? entry.mediaType : '') }
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

  /** An OCI layout stores no signatures. */
  async getSignatures(): Promise<Buffer[]> {
    return []
  }

  async close(): Promise<void> {}
}

// ---------------------------------------------------------------------------------------------
// Destination

/** Blob paths held by open destinations of this process, so an uncommitted close keeps them. */
const claims = new Map<string, number>()

/**
 * Writes one image into a layout that may hold others. Blobs go to `blobs/<alg>/` through
 * verified temporary files; commit() adds the entry to index.json. Closing without commit
 * removes the blobs it created unless index.json or another open destination uses them.
 */
class OciLayoutDestination implements ImageDestination {
  /** putBlob writes each chunk to a blob file and keeps none (see slabLender). */
  readonly [slabTaker] = true

  readonly #claimed = new Set<string>()
  readonly #created = new Set<string>()
  #top: Descriptor | undefined
  #committed = false

  constructor(readonly reference: OciLayoutReference) {}

  /** putBlobFromFile hard-links a plain 0644 file from the layout's file system. */
  get linkDirectory(): string {
    return this.reference.resolvedDir
  }

  /** OCI types only, as in containers/image: a copy converts Docker manifests first. */
  supportedManifestMIMETypes(): string[] {
    return [MediaType.ociManifest, MediaType.ociIndex]
  }

  desiredLayerCompression(): LayerCompression {
    return 'preserve'
  }

  acceptsImageLists(): boolean {
    return true
  }

  async putBlob(stream: Readable, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    const expected = info.digest === undefined ? undefined : parseDigest(info.digest)
    const dir = await this.#blobDir(expected)
    const stored = await writeBlob(stream, dir, (d) => this.reference.blobPath(d), {
      expected, size: info.size, signal: opts?.signal, durable: this.reference.options.durable,
    })
    return this.#stored(info, stored)
  }

  async putBlobFromFile(path: string, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    const expected = info.digest === undefined ? undefined : parseDigest(info.digest)
    const dir = await this.#blobDir(expected)
    const stored = await copyBlob(path, dir, (d) => this.reference.blobPath(d), {
      expected, size: info.size, signal: opts?.signal, durable: this.reference.options.durable,
    })
    return this.#stored(info, stored)
  }

  async #blobDir(expected: Digest | undefined): Promise<string> {
    const dir = join(this.reference.resolvedDir, 'blobs', expected ? digestAlgorithm(expected) : 'sha256')
    await ensureDir(dir)
    return dir
  }

  #stored(info: BlobInfo, stored: StoredBlob): BlobInfo {
    this.#claim(stored.path)
    if (stored.created) this.#created.add(stored.path)
    return { ...info, digest: stored.digest, size: stored.size }
  }

  #claim(path: string): void {
    if (this.#claimed.has(path)) return
    this.#claimed.add(path)
    claims.set(path, (claims.get(path) ?? 0) + 1)
  }

  async tryReusingBlob(info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo | undefined> {
    opts?.signal?.throwIfAborted()
    if (info.digest === undefined) return undefined
    const digest = parseDigest(info.digest)
    const path = this.reference.blobPath(digest)
    const size = await fileSize(path)
    if (size === undefined || (info.size >= 0 && size !== info.size)) return undefined
    this.#claim(path)
    log('reusing blob %s', digest)
    return { ...info, digest, size }
  }

  /** Validates and stores the manifest as a blob; the top-level one is named at commit(). */
  async putManifest(bytes: Buffer, instanceDigest?: Digest, opts?: CallOptions): Promise<void> {
    const parsed = parseManifest(bytes)
    const digest = instanceDigest === undefined ? digestOf(bytes) : parseDigest(instanceDigest)
    const dir = await this.#blobDir(digest)
    const stored = await writeBlob(Readable.from([bytes]), dir, (d) => this.reference.blobPath(d), {
      expected: digest, size: bytes.length, signal: opts?.signal, durable: this.reference.options.durable,
    })
    this.#stored({ size: bytes.length }, stored)
    if (instanceDigest !== undefined) return
    this.#top = { mediaType: parsed.mediaType, digest, size: bytes.length }
    if (this.reference.image) this.#top.annotations = { [OCI_REF_NAME]: this.reference.image }
  }

  /**
   * Adds the image to index.json as containers/image does: an entry of the same name loses
   * its name, an unnamed entry of the same digest is replaced, else the entry is appended.
   * `oci-layout` and `index.json` are each replaced atomically.
   */
  async commit(opts?: CallOptions): Promise<void> {
    const top = this.#top
    if (!top) throw new ImageError('MANIFEST_UNKNOWN', `commit to oci:${this.reference.dir} before putManifest`)
    const root = this.reference.resolvedDir
    await withLayoutLock(root, async () => {
      opts?.signal?.throwIfAborted()
      let index: RawIndex
      try {
        index = await readIndexFile(root, opts)
      } catch (err) {
        if ((err as ImageError).code !== 'MANIFEST_UNKNOWN') throw err
        index = JSON.parse(emptyIndex()) as RawIndex
      }
      const manifests = index.manifests.map((e) => {
        if (!top.annotations || refName(e) !== this.reference.image) return e
        const { [OCI_REF_NAME]: _, ...rest } = e.annotations as Record<string, unknown>
        const { annotations: _a, ...entry } = e
        return Object.keys(rest).length ? { ...entry, annotations: rest } : entry
      })
      const same = manifests.findIndex((e) => e.digest === top.digest && refName(e) === undefined)
      if (same >= 0) manifests[same] = { ...top }
      else manifests.push({ ...top })
      await writeFileAtomic(join(root, 'oci-layout'), OCI_LAYOUT_FILE)
      await writeFileAtomic(join(root, 'index.json'), JSON.stringify({ ...index, manifests }))
    })
    this.#committed = true
    log('committed %s to oci:%s', top.digest, this.reference.stringWithinTransport())
  }

  async close(): Promise<void> {
    try {
      if (this.#committed || this.#created.size === 0) return
      await withLayoutLock(this.reference.resolvedDir, () => this.#removeCreated())
    } finally {
      for (const path of this.#claimed) {
        const n = (claims.get(path) ?? 1) - 1
        if (n > 0) claims.set(path, n)
        else claims.delete(path)
      }
      this.#claimed.clear()
    }
  }

  async #removeCreated(): Promise<void> {
    let keep: Set<Digest>
    try {
      const index = await readIndexFile(this.reference.resolvedDir).catch((err) => {
        if ((err as ImageError).code === 'MANIFEST_UNKNOWN') return { manifests: [] } as RawIndex
        throw err
      })
      keep = await referencedBlobs(this.reference, index.manifests.map((d, i) => checkDescriptor(d, `index.json manifests[${i}]`)))
    } catch (err) {
      log('keeping %d staged blobs in %s: %s', this.#created.size, this.reference.dir, (err as Error).message)
      return
    }
    const keepPaths = new Set([...keep].map((d) => this.reference.blobPath(d)))
    let removed = 0
    for (const path of this.#created) {
      if (keepPaths.has(path) || (claims.get(path) ?? 0) > 1) continue
      await rm(path, { force: true })
      removed++
    }
    log('closed uncommitted oci:%s: removed %d blobs', this.reference.stringWithinTransport(), removed)
  }
}
