// "docker-archive:/file.tar[:name:tag|:@N]": the `docker save` format, read in place from the tar
// (range reads, no extraction) and written, as skopeo writes it, through a staging directory.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable, Writable, addAbortSignal } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import { decompressStream, detectCompression } from '../compression.js'
import { type Digest, digestHex, digestOf, parseDigest } from '../digest.js'
import { ImageError, errnoCode } from '../errors.js'
import { MAX_CONFIG_SIZE } from '../image.js'
import { type ImageManifest, convertManifest, manifestDigest, parseManifest } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { type NamedReference, isDigested, parseNormalizedNamed, withDefaultTag } from '../name.js'
import { type TarIndex, type TarWriteEntry, openTarIndex, writeTarFile } from '../tar.js'
import type {
  BlobChunk, BlobInfo, CallOptions, DetectedAlgorithm, ImageDestination, ImageReference, ImageSource, ImageTransport,
  PutBlobOptions, SystemContext,
} from '../types.js'
import { copyBlob, writeBlob } from './fs-util.js'
import { slabTaker } from '../io/hash-thread.js'

const log = debug('blobcache:transports:docker-archive')

/** The `docker-archive` transport: `docker save` tar files. */
export const dockerArchive: ImageTransport = {
  name: 'docker-archive',
  parseReference: (s) => DockerArchiveReference.parse(s),
}

/**
 * `path[:name:tag]` or `path:@N`. A name (normalised, `:latest` added) selects the image by its
 * RepoTag when reading and is written as its RepoTag; `@N` selects the N-th image (source only).
 */
export class DockerArchiveReference implements ImageReference {
  readonly transport = dockerArchive

  constructor(
    readonly path: string,
    readonly named?: NamedReference,
    readonly sourceIndex?: number,
  ) {}

  /** Parses the part after `docker-archive:`. Throws `REFERENCE_INVALID`. */
  static parse(s: string): DockerArchiveReference {
    const colon = s.indexOf(':')
    const path = colon < 0 ? s : s.slice(0, colon)
    if (path === '') throw new ImageError('REFERENCE_INVALID', `docker-archive reference ${JSON.stringify(s)} has no path`)
    if (colon < 0) return new DockerArchiveReference(path)
    const rest = s.slice(colon + 1)
    if (rest.startsWith('@')) {
      if (!/^@\d{1,9}$/.test(rest)) throw new ImageError('REFERENCE_INVALID', `invalid docker-archive source index ${JSON.stringify(rest)}`)
      return new DockerArchiveReference(path, undefined, Number(rest.slice(1)))
    }
    const named = withDefaultTag(parseNormalizedNamed(rest))
    if (isDigested(named)) throw new ImageError('REFERENCE_INVALID', `docker-archive does not support digest references: ${s}`)
    return new DockerArchiveReference(path, named)
  }

  stringWithinTransport(): string {
    if (this.named) return `${this.path}:${this.named.toString()}`
    return this.sourceIndex === undefined ? this.path : `${this.path}:@${this.sourceIndex}`
  }

  dockerReference(): NamedReference | undefined {
    return this.named
  }

  newImageSource(ctx: SystemContext = {}): Promise<ImageSource> {
    return openSource(this, ctx)
  }

  async newImageDestination(ctx: SystemContext = {}): Promise<ImageDestination> {
    if (this.sourceIndex !== undefined) {
      throw new ImageError('REFERENCE_INVALID', `docker-archive:${this.stringWithinTransport()}: a destination cannot use a source index`)
    }
    // as containers/image: an archive that already holds images is not modified
    const existing = await stat(this.path).catch((err) => (errnoCode(err) === 'ENOENT' ? undefined : Promise.reject(err)))
    if (existing?.isFile() && existing.size > 0) {
      throw new ImageError('UNSUPPORTED', `docker-archive:${this.path}: the archive exists; docker-archive does not modify existing archives`)
    }
    const staging = await mkdtemp(join(ctx.tmpDir ?? tmpdir(), 'blobcache-docker-archive-'))
    return new DockerArchiveDestination(this, staging)
  }

  async deleteImage(): Promise<void> {
    throw new ImageError('UNSUPPORTED', 'deleting images is not supported by docker-archive')
  }
}

/** One entry of `manifest.json`. */
interface ManifestItem {
  Config: string
  RepoTags: string[] | null
  Layers: string[]
}

const broken = (file: string, msg: string, cause?: unknown) =>
  new ImageError('ARCHIVE_INVALID', `docker-archive:${file}: ${msg}`, cause === undefined ? undefined : { cause })

function parseItems(file: string, bytes: Buffer): ManifestItem[] {
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw broken(file, 'manifest.json is not JSON', err)
  }
  const ok = (x: unknown) => Array.isArray(x) && x.every((s) => typeof s === 'string')
  if (!Array.isArray(doc)) throw broken(file, 'manifest.json is not an array')
  for (const item of doc as Record<string, unknown>[]) {
    if (typeof item !== 'object' || item === null || typeof item.Config !== 'string' || !ok(item.Layers) ||
      (item.RepoTags != null && !ok(item.RepoTags))) {
      throw broken(file, 'manifest.json has a malformed entry')
    }
  }
  return doc as ManifestItem[]
}

function chooseItem(ref: DockerArchiveReference, items: ManifestItem[]): ManifestItem {
  if (ref.named) {
    const want = ref.named.toString()
    const found = items.find((it) => (it.RepoTags ?? []).some((t) => {
      try {
        return withDefaultTag(parseNormalizedNamed(t)).toString() === want
      } catch {
        return false
      }
    }))
    if (!found) throw new ImageError('MANIFEST_UNKNOWN', `docker-archive:${ref.path}: no image tagged ${want}`)
    return found
  }
  if (ref.sourceIndex !== undefined) {
    const item = items[ref.sourceIndex]
    if (!item) throw new ImageError('MANIFEST_UNKNOWN', `docker-archive:${ref.path}: no image @${ref.sourceIndex} (${items.length} in the archive)`)
    return item
  }
  if (items.length === 1) return items[0]
  throw new ImageError(items.length ? 'REFERENCE_INVALID' : 'MANIFEST_UNKNOWN',
    `docker-archive:${ref.path}: ${items.length} images in the archive; name one with :name:tag or :@N`)
}

/** Where the bytes of a layer blob are, and how they are served. */
interface LayerBlob {
  path: string
  size: number
  mediaType: string
  /** The layer file is compressed with an algorithm Docker schema 2 cannot name: serve it decompressed. */
  decompress?: DetectedAlgorithm
}

/** Digests and sizes computed from layer files, by archive version and entry offset. */
const computed = new Map<string, { digest: Digest; size: number }>()
const COMPUTED_MAX = 4096

async function computeOnce(index: TarIndex, path: string, alg: DetectedAlgorithm | null, signal?: AbortSignal) {
  const entry = index.resolve(path)!
  const key = `${index.identity}:${entry.offset}:${alg ?? 'raw'}`
  const hit = computed.get(key)
  if (hit) return hit
  const hash = createHash('sha256')
  let size = 0
  const sink = new Writable({
    highWaterMark: 1 << 20,
    write(chunk: Buffer, _enc, cb) {
      hash.update(chunk)
      size += chunk.length
      cb()
    },
  })
  const raw = index.open(path)
  await (alg ? pipeline(raw, decompressStream(alg), sink, { signal }) : pipeline(raw, sink, { signal }))
  const value = { digest: `sha256:${hash.digest('hex')}` as Digest, size }
  if (computed.size >= COMPUTED_MAX) computed.delete(computed.keys().next().value!)
  computed.set(key, value)
  log('computed %s of %s in %s', value.digest, path, index.file)
  return value
}

async function peek(index: TarIndex, path: string, size: number): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of index.open(path, { length: Math.min(size, 8) })) chunks.push(c as Buffer)
  return Buffer.concat(chunks)
}

/**
 * Builds the Docker schema 2 manifest of the chosen image, as containers/image does: the config
 * file's sha256 names the config, and an uncompressed layer file is named by its diffID (from
 * the config; the caller's copy verifies it), so opening costs no hashing. Unlike
 * containers/image (which labels every layer `diff.tar.gzip` and serves compressed files
 * decompressed), the media type says what the file holds: a plain tar is `diff.tar`; a gzip
 * file is served as it is (`diff.tar.gzip`, named by the sha256 of its bytes: one hashing pass
 * at open); a file compressed otherwise (zstd, bzip2, xz) is served decompressed (`diff.tar`:
 * one decompression pass at open to learn its size). Both results are cached per archive
 * version. The manifest bytes are therefore not containers/image's.
 */
async function openSource(ref: DockerArchiveReference, ctx: SystemContext): Promise<ImageSource> {
  try {
    return await buildSource(ref, ctx)
  } catch (err) {
    throw ctx.signal?.aborted ? ctx.signal.reason : err
  }
}

async function buildSource(ref: DockerArchiveReference, ctx: SystemContext): Promise<ImageSource> {
  const { signal } = ctx
  const index = await openTarIndex(ref.path, { signal }).catch((err) => {
    if (errnoCode(err) === 'ENOENT') throw new ImageError('MANIFEST_UNKNOWN', `docker-archive:${ref.path}: no such archive`, { cause: err })
    throw err
  })
  const items = parseItems(ref.path, await index.readFile('manifest.json', { notFoundCode: 'MANIFEST_UNKNOWN', signal }))
  const item = chooseItem(ref, items)
  const config = await index.readFile(item.Config, { notFoundCode: 'BLOB_UNKNOWN', maxBytes: MAX_CONFIG_SIZE, signal })
  let diffIDs: Digest[]
  try {
    const ids = (JSON.parse(config.toString('utf8')) as { rootfs?: { diff_ids?: unknown } })?.rootfs?.diff_ids
    if (!Array.isArray(ids)) throw new Error('no rootfs.diff_ids')
    diffIDs = ids.map(parseDigest)
  } catch (err) {
    throw broken(ref.path, `config ${item.Config} is not an image config: ${(err as Error).message}`, err)
  }
  if (diffIDs.length !== item.Layers.length) {
    throw broken(ref.path, `${item.Layers.length} layers in manifest.json but ${diffIDs.length} diff_ids in the config`)
  }
  const layers = new Map<Digest, LayerBlob>()
  const descriptors: { mediaType: string; digest: Digest; size: number }[] = []
  for (const [i, path] of item.Layers.entries()) {
    signal?.throwIfAborted()
    const entry = index.resolve(path)
    if (!entry) throw new ImageError('BLOB_UNKNOWN', `docker-archive:${ref.path}: layer ${path} is not in the archive`)
    if (entry.type !== 'file') throw broken(ref.path, `layer ${path} is a ${entry.type}`)
    const alg = detectCompression(await peek(index, path, entry.size))
    let blob: LayerBlob & { digest: Digest }
    if (alg === null) blob = { path, size: entry.size, mediaType: MediaType.dockerLayer, digest: diffIDs[i] }
    else if (alg === 'gzip') blob = { path, ...(await computeOnce(index, path, null, signal)), mediaType: MediaType.dockerLayerGzip }
    else {
      const { size } = await computeOnce(index, path, alg, signal)
      blob = { path, size, mediaType: MediaType.dockerLayer, digest: diffIDs[i], decompress: alg }
    }
    if (!layers.has(blob.digest)) layers.set(blob.digest, blob)
    descriptors.push({ mediaType: blob.mediaType, digest: blob.digest, size: blob.size })
  }
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: MediaType.dockerManifest,
    config: { mediaType: MediaType.dockerConfig, digest: digestOf(config), size: config.length },
    layers: descriptors,
  }))
  log('opened %s: image %s, %d layers', ref.path, item.Config, descriptors.length)
  return new DockerArchiveSource(ref, index, config, manifest, layers)
}

class DockerArchiveSource implements ImageSource {
  readonly #configDigest: Digest

  constructor(
    readonly reference: DockerArchiveReference,
    private readonly index: TarIndex,
    private readonly config: Buffer,
    private readonly manifest: Buffer,
    private readonly layers: Map<Digest, LayerBlob>,
  ) {
    this.#configDigest = digestOf(config)
  }

  async getManifest(instanceDigest?: Digest): Promise<{ bytes: Buffer; mediaType: string }> {
    if (instanceDigest && instanceDigest !== manifestDigest(this.manifest)) {
      throw new ImageError('MANIFEST_UNKNOWN', `docker-archive:${this.reference.path}: no manifest ${instanceDigest} (archives hold no image lists)`)
    }
    return { bytes: this.manifest, mediaType: MediaType.dockerManifest }
  }

  #blob(info: BlobInfo): LayerBlob | 'config' {
    const digest = parseDigest(info.digest)
    if (digest === this.#configDigest) return 'config'
    const layer = this.layers.get(digest)
    if (!layer) throw new ImageError('BLOB_UNKNOWN', `docker-archive:${this.reference.path}: no blob ${digest}`)
    return layer
  }

  async getBlob(info: BlobInfo, opts: CallOptions = {}): Promise<{ stream: Readable; size: number }> {
    opts.signal?.throwIfAborted()
    const blob = this.#blob(info)
    if (blob === 'config') return { stream: Readable.from([this.config]), size: this.config.length }
    let stream = this.index.open(blob.path)
    if (blob.decompress) {
      const decompressed = decompressStream(blob.decompress)
      pipeline(stream, decompressed).catch(() => {}) // an error reaches the consumer through `decompressed`
      stream = decompressed
    }
    if (opts.signal) addAbortSignal(opts.signal, stream)
    return { stream, size: blob.size }
  }

  async *getBlobAt(info: BlobInfo, chunks: BlobChunk[], opts: CallOptions = {}): AsyncIterable<Readable> {
    const blob = this.#blob(info)
    if (blob !== 'config' && blob.decompress) throw new ImageError('UNSUPPORTED', `blob ${info.digest} is served decompressed; no ranges`)
    for (const c of chunks) {
      opts.signal?.throwIfAborted()
      if (blob === 'config') {
        const end = c.length < 0 ? this.config.length : c.offset + c.length
        if (c.offset < 0 || end > this.config.length) throw new ImageError('SIZE_INVALID', `range outside blob ${info.digest}`)
        yield Readable.from([this.config.subarray(c.offset, end)])
      } else yield this.index.open(blob.path, { start: c.offset, length: c.length })
    }
  }

  async getSignatures(): Promise<Buffer[]> {
    return []
  }

  async close(): Promise<void> {}
}

/** Stages blobs in a temp dir, then writes the archive (as skopeo 1.9 does) on commit. */
class DockerArchiveDestination implements ImageDestination {
  /** putBlob writes each chunk to a blob file and keeps none (see slabLender). */
  readonly [slabTaker] = true

  readonly #blobs = new Map<Digest, { size: number; file: string }>()
  #manifest: ImageManifest | undefined
  #committed = false

  constructor(
    readonly reference: DockerArchiveReference,
    private readonly staging: string,
  ) {}

  supportedManifestMIMETypes(): string[] {
    return [MediaType.dockerManifest]
  }

  /** `docker load` wants uncompressed layers, as in containers/image. */
  desiredLayerCompression(): 'decompress' {
    return 'decompress'
  }

  acceptsImageLists(): boolean {
    return false
  }

  async putBlob(stream: Readable, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    const stored = await writeBlob(stream, this.staging, this.#target, {
      expected: info.digest, size: info.size, signal: opts.signal, durable: false,
    })
    return this.#stored(info, stored)
  }

  async putBlobFromFile(path: string, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    const stored = await copyBlob(path, this.staging, this.#target, {
      expected: info.digest, size: info.size, signal: opts.signal, durable: false,
    })
    return this.#stored(info, stored)
  }

  readonly #target = (d: Digest) => join(this.staging, d.replace(':', '-'))

  #stored(info: BlobInfo, stored: { digest: Digest; size: number; path: string }): BlobInfo {
    this.#blobs.set(stored.digest, { size: stored.size, file: stored.path })
    return { digest: stored.digest, size: stored.size, mediaType: info.mediaType }
  }

  async tryReusingBlob(info: BlobInfo): Promise<BlobInfo | undefined> {
    const b = info.digest && this.#blobs.get(info.digest)
    if (!b || (info.size >= 0 && info.size !== b.size)) return undefined
    return { digest: info.digest!, size: b.size, mediaType: info.mediaType }
  }

  /**
   * Takes the image's manifest. The archive stores no manifest bytes, only the config and layer
   * files it names, so an OCI image manifest is accepted too and converted (`UNSUPPORTED` for
   * what schema 2 cannot describe, such as zstd layers); image lists fail `UNSUPPORTED`.
   */
  async putManifest(bytes: Buffer, instanceDigest?: Digest): Promise<void> {
    if (instanceDigest) throw new ImageError('UNSUPPORTED', 'docker-archive cannot store image lists')
    const parsed = parseManifest(bytes)
    if (parsed.kind !== 'image') throw new ImageError('UNSUPPORTED', 'docker-archive cannot store image lists')
    this.#manifest = parsed.mediaType === MediaType.dockerManifest ? parsed.manifest : convertManifest(parsed.manifest, 'v2s2')
  }

  async commit(opts: CallOptions = {}): Promise<void> {
    const m = this.#manifest
    if (!m) throw new ImageError('MANIFEST_UNKNOWN', `docker-archive:${this.reference.path}: commit without a manifest`)
    const staged = (d: Digest) => {
      const b = this.#blobs.get(d)
      if (!b) throw new ImageError('BLOB_UNKNOWN', `docker-archive:${this.reference.path}: blob ${d} was not written`)
      return b
    }
    const stagedConfig = staged(m.config.digest)
    if (stagedConfig.size > MAX_CONFIG_SIZE) throw new ImageError('SIZE_INVALID', `config ${m.config.digest}: ${stagedConfig.size} bytes is larger than ${MAX_CONFIG_SIZE}`)
    const config = await readFile(stagedConfig.file)
    const entries: TarWriteEntry[] = []
    const file = (path: string, data: Buffer): TarWriteEntry => ({ path, size: data.length, mode: 0o444, open: () => Readable.from([data]) })
    for (const l of m.layers) {
      const { file: f, size } = staged(l.digest)
      if (!entries.some((e) => e.path === `${digestHex(l.digest)}.tar`)) {
        entries.push({ path: `${digestHex(l.digest)}.tar`, size, mode: 0o444, open: () => createReadStream(f, { highWaterMark: 1 << 20 }) })
      }
    }
    entries.push(file(`${digestHex(m.config.digest)}.json`, config))
    const tags = this.reference.named ? [this.reference.named] : []
    const { entries: legacy, topLayerID } = legacyLayers(m, config)
    entries.push(...legacy.map((e) => ('data' in e ? file(e.path, e.data) : e)))
    const item = {
      Config: `${digestHex(m.config.digest)}.json`,
      RepoTags: tags.map((t) => `${t.name()}:${t.tag}`),
      Layers: m.layers.map((l) => `${digestHex(l.digest)}.tar`),
    }
    entries.push(file('manifest.json', Buffer.from(JSON.stringify([item]))))
    const repositories: Record<string, Record<string, string>> = {}
    if (topLayerID) for (const t of tags) (repositories[t.name()] ??= {})[t.tag!] = topLayerID
    entries.push(file('repositories', Buffer.from(JSON.stringify(repositories))))
    await writeTarFile(this.reference.path, entries, { signal: opts.signal })
    this.#committed = true
    log('committed %s: %d layers', this.reference.path, m.layers.length)
  }

  async close(): Promise<void> {
    await rm(this.staging, { recursive: true, force: true })
    if (!this.#committed) log('closed %s without commit', this.reference.path)
  }
}

/**
 * The legacy per-layer metadata (`<id>/layer.tar` symlink, `VERSION`, `json`) that skopeo writes
 * for old `docker load`s. IDs are derived as containers/image derives them (a digest of the
 * layer's JSON with its chain ID), so they are deterministic and unique per layer chain.
 */
function legacyLayers(m: ImageManifest, config: Buffer) {
  let parsed: Record<string, unknown> = {}
  try {
    const doc: unknown = JSON.parse(config.toString('utf8'))
    if (typeof doc === 'object' && doc !== null && !Array.isArray(doc)) parsed = doc as Record<string, unknown>
  } catch {
    // not JSON: the top layer's json then lacks the config fields
  }
  const sorted = (o: Record<string, unknown>) => JSON.stringify(Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1))))
  const entries: (TarWriteEntry | { path: string; data: Buffer })[] = []
  const seen = new Set<string>()
  let chainID: string | undefined
  let last = ''
  m.layers.forEach((l, i) => {
    const layerConfig: Record<string, unknown> = {}
    if (last) layerConfig.parent = last
    if (i === m.layers.length - 1) {
      for (const k of ['architecture', 'config', 'container', 'container_config', 'created', 'docker_version', 'os']) layerConfig[k] = parsed[k] ?? null
    }
    chainID = chainID ? digestOf(`${chainID} ${l.digest}`) : l.digest
    const id = digestHex(digestOf(sorted({ ...layerConfig, layer_id: chainID })))
    layerConfig.id = id
    if (!seen.has(id)) {
      seen.add(id)
      entries.push({ path: `${id}/layer.tar`, type: 'symlink', mode: 0, linkname: `../${digestHex(l.digest)}.tar` })
      entries.push({ path: `${id}/VERSION`, data: Buffer.from('1.0') })
      entries.push({ path: `${id}/json`, data: Buffer.from(sorted(layerConfig)) })
    }
    last = id
  })
  return { entries, topLayerID: last }
}
