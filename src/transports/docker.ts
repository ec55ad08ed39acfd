// docker://host[:port]/repo[:tag|@digest]: images in a registry speaking the OCI distribution API.
import type { Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestOf } from '../digest.js'
import { ImageError } from '../errors.js'
import { parseManifest } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { type NamedReference, parseNormalizedNamed, withDefaultTag } from '../name.js'
import { RegistryClient } from '../registry/client.js'
import { openBlob } from '../registry/download.js'
import { firstServing, loadRegistriesConf, pullSources, sourceOptions } from '../registry/registries-conf.js'
import { blobLocations, recordBlobLocation } from '../registry/locations.js'
import { type TagListOptions, deleteManifest, fetchManifest, fetchTags, headManifest, pushManifest } from '../registry/manifests.js'
import { headBlob, mountBlob, uploadBlob } from '../registry/upload.js'
import type {
  BlobChunk, BlobInfo, CallOptions, ImageDestination, ImageReference, ImageSource, ImageTransport, LayerCompression,
  PutBlobOptions, SystemContext, WarmUpHints,
} from '../types.js'
import { type LendingOptions, slabLender } from '../io/hash-thread.js'

const log = debug('blobcache:transports:docker')

/** Mount attempts per blob in {@link ImageDestination.tryReusingBlob}. */
const MAX_MOUNT_CANDIDATES = 3

/** The `docker:` transport: `docker://registry/repo[:tag|@digest]`, normalised as docker does. */
export const docker: ImageTransport = {
  name: 'docker',
  parseReference: (s: string) => parseDockerReference(s),
}

/**
 * Parses the part after `docker:`: `//` then a docker reference. A name without tag or digest
 * gets `:latest`; `alpine` means `docker.io/library/alpine`. A reference with both a tag and
 * a digest is refused (as containers/image does). Throws `REFERENCE_INVALID`.
 */
export function parseDockerReference(s: string): DockerReference {
  if (!s.startsWith('//')) {
    throw new ImageError('REFERENCE_INVALID', `invalid docker reference ${JSON.stringify(s)}: it must start with //`)
  }
  return new DockerReference(withDefaultTag(parseNormalizedNamed(s.slice(2))))
}

/**
 * An image in a registry, named by a normalised reference with a tag or a digest (not both, as
 * in containers/image). Signatures are neither read nor written: sigstore attachments and
 * lookaside storage are out of scope, so a copy that must keep signatures refuses this
 * destination unless told to remove them.
 */
export class DockerReference implements ImageReference {
  readonly transport = docker
  /** Throws `REFERENCE_INVALID` for a name with neither or both of tag and digest. */
  constructor(readonly named: NamedReference) {
    if ((named.tag === undefined) === (named.digest === undefined)) {
      const why = named.tag === undefined ? 'needs a tag or a digest' : 'has both a tag and a digest, which is not supported'
      throw new ImageError('REFERENCE_INVALID', `invalid docker reference //${named.toString()}: it ${why}`)
    }
  }

  /** The registry as named (`docker.io`, `127.0.0.1:5000`). */
  get registry(): string {
    return this.named.domain
  }

  /** The repository path (`library/alpine`). */
  get repository(): string {
    return this.named.path
  }

  /** The tag or digest this reference points at, as used in manifest URLs. */
  get manifestReference(): string {
    return this.named.digest ?? this.named.tag!
  }

  stringWithinTransport(): string {
    return `//${this.named.toString()}`
  }

  dockerReference(): NamedReference {
    return this.named
  }

  /**
   * Opens the image for reading where registries.conf says (see registries-conf.ts): each
   * mirror that applies, then the primary location, the first that serves the manifest. A
   * `blocked` namespace fails `REGISTRY_BLOCKED`; an `insecure` one allows plain HTTP and
   * unverified TLS unless `tlsVerify` is set.
   */
  async newImageSource(ctx?: SystemContext): Promise<ImageSource> {
    const conf = await loadRegistriesConf({ path: ctx?.registry?.registriesConf })
    const sources = pullSources(conf, this.named)
    const [only] = sources
    if (sources.length === 1 && only.named === this.named && !only.insecure) return new DockerSource(this, clientFor(this, ctx))
    const signal = ctx?.signal
    const { value } = await firstServing(this.named, sources, async (source) => {
      const opened = new DockerSource(this, new RegistryClient(source.named.domain, sourceOptions(source, ctx?.registry ?? {})), source.named)
      await opened.getManifest(undefined, { signal })
      return opened
    }, signal)
    return value
  }

  async newImageDestination(ctx?: SystemContext): Promise<ImageDestination> {
    return new DockerDestination(this, clientFor(this, ctx))
  }

  /** Deletes the manifest this reference resolves to (every tag naming that digest goes with it). */
  async deleteImage(ctx?: SystemContext): Promise<void> {
    const client = clientFor(this, ctx)
    const digest = this.named.digest ?? (await fetchManifest(client, this.repository, this.manifestReference, ctx?.signal)).digest
    await deleteManifest(client, this.repository, digest, ctx?.signal)
  }
}

function clientFor(ref: DockerReference, ctx?: SystemContext): RegistryClient {
  return new RegistryClient(ref.registry, ctx?.registry ?? {})
}

/**
 * Lists the tags of the repository of `ref` (a `docker:` reference or a docker name), following
 * the registry's pagination.
 */
export async function listTags(ref: ImageReference | NamedReference, opts: SystemContext & TagListOptions = {}): Promise<string[]> {
  const named = 'transport' in ref ? ref.dockerReference() : ref
  if (!named || ('transport' in ref && ref.transport.name !== 'docker')) {
    throw new ImageError('UNSUPPORTED', 'listing tags needs a docker:// reference')
  }
  const client = new RegistryClient(named.domain, opts.registry ?? {})
  return fetchTags(client, named.path, opts)
}

class DockerSource implements ImageSource {
  /** getBlob reads into the `allocate` a copy gives it (see slabLender). */
  readonly [slabLender] = true
  #top: Promise<{ bytes: Buffer; mediaType: string }> | undefined
  /** Where the image is read: the reference's own place, or a mirror or remapped location (registries.conf). */
  readonly at: NamedReference

  constructor(
    readonly reference: DockerReference,
    readonly client: RegistryClient,
    at?: NamedReference,
  ) {
    this.at = at ?? reference.named
  }

  getManifest(instanceDigest?: Digest, opts: CallOptions = {}): Promise<{ bytes: Buffer; mediaType: string }> {
    if (instanceDigest) return this.#fetch(instanceDigest, opts.signal)
    if (!this.#top) {
      this.#top = this.#fetch(this.at.digest ?? this.at.tag!, opts.signal)
      this.#top.catch(() => (this.#top = undefined))
    }
    return this.#top
  }

  async #fetch(reference: string, signal?: AbortSignal): Promise<{ bytes: Buffer; mediaType: string }> {
    const { domain: registry, path: repository } = this.at
    const { bytes, mediaType } = await fetchManifest(this.client, repository, reference, signal)
    try {
      const parsed = parseManifest(bytes, mediaType)
      if (parsed.kind === 'image') {
        for (const d of [parsed.manifest.config, ...parsed.manifest.layers]) recordBlobLocation(d.digest, registry, repository)
      }
    } catch {
      // not ours to judge here; the caller parses (and rejects) it
    }
    return { bytes, mediaType }
  }

  /** Streams a blob, resuming with Range after a dropped connection; sizes are checked, digests are the caller's to verify. */
  async getBlob(info: BlobInfo, opts: CallOptions & LendingOptions = {}): Promise<{ stream: Readable; size: number }> {
    if (!info.digest) throw new ImageError('BLOB_UNKNOWN', 'a registry blob can only be fetched by digest')
    const { domain: registry, path: repository } = this.at
    // The ImageSource contract leaves verification to the caller (copyImage verifies every blob
    // in flight); hashing here as well would double the main-thread cost of a pull.
    const blob = await openBlob(this.client, repository, info.digest, info.size, { signal: opts.signal, verify: false, allocate: opts.allocate })
    recordBlobLocation(info.digest, registry, repository)
    return blob
  }

  async *getBlobAt(info: BlobInfo, chunks: BlobChunk[], opts: CallOptions = {}): AsyncIterable<Readable> {
    if (!info.digest) throw new ImageError('BLOB_UNKNOWN', 'a registry blob can only be fetched by digest')
    for (const range of chunks) {
      opts.signal?.throwIfAborted()
      const { stream } = await openBlob(this.client, this.at.path, info.digest, info.size, { signal: opts.signal, range })
      yield stream
    }
  }

  /** Signatures are not read from registries (sigstore attachments and lookaside are out of scope). */
  async getSignatures(): Promise<Buffer[]> {
    return []
  }

  async close(): Promise<void> {}
}

class DockerDestination implements ImageDestination {
  #pending: Buffer | undefined
  /** The HEAD of the reference that warmUp started: its answer, or undefined when it failed. */
  #early: { answer: Promise<{ found: Awaited<ReturnType<typeof headManifest>> } | undefined>; stop: AbortController } | undefined

  constructor(
    readonly reference: DockerReference,
    readonly client: RegistryClient,
  ) {}

  supportedManifestMIMETypes(): string[] {
    return [MediaType.ociManifest, MediaType.dockerManifest, MediaType.ociIndex, MediaType.dockerManifestList]
  }

  /** Registries want compressed layers, as containers/image's docker destination does. */
  desiredLayerCompression(): LayerCompression {
    return 'compress'
  }

  acceptsImageLists(): boolean {
    return true
  }

  async putBlob(stream: Readable, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    const { registry, repository } = this.reference
    const stored = await uploadBlob(this.client, repository, stream, info, { signal: opts.signal })
    recordBlobLocation(stored.digest!, registry, repository)
    return stored
  }

  /** HEAD in this repository, then a cross-repository mount from repositories of the same registry known to hold the blob. */
  async tryReusingBlob(info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo | undefined> {
    const digest = info.digest
    if (!digest) return undefined
    const { registry, repository } = this.reference
    const size = await headBlob(this.client, repository, digest, opts.signal, true)
    if (size !== undefined && (info.size < 0 || size < 0 || size === info.size)) {
      log('blob %s already in %s/%s', digest, registry, repository)
      recordBlobLocation(digest, registry, repository)
      return { digest, size: size >= 0 ? size : info.size, ...(info.mediaType ? { mediaType: info.mediaType } : {}) }
    }
    for (const from of blobLocations(digest, registry, repository).slice(0, MAX_MOUNT_CANDIDATES)) {
      if (await mountBlob(this.client, repository, digest, from, opts.signal)) {
        recordBlobLocation(digest, registry, repository)
        const mounted = info.size >= 0 ? info.size : ((await headBlob(this.client, repository, digest, opts.signal, true)) ?? -1)
        return { digest, size: mounted, ...(info.mediaType ? { mediaType: info.mediaType } : {}) }
      }
    }
    return undefined
  }

  /**
   * HEAD of the tag (or digest) the manifest would be pushed to. By digest, an answer is the
   * manifest; by tag, the registry's `Docker-Content-Digest` must name `digest`. The registry
   * checked every blob a manifest names when it was pushed, so they are there too.
   */
  async hasManifest(digest: Digest, instanceDigest?: Digest, opts: CallOptions = {}): Promise<boolean> {
    const reference = instanceDigest ?? this.reference.manifestReference
    if (instanceDigest && instanceDigest !== digest) return false
    const pinned = this.reference.named.digest
    if (!instanceDigest && pinned && pinned !== digest) return false
    const early = instanceDigest ? undefined : await this.#early?.answer
    const found = early ? early.found : await headManifest(this.client, this.reference.repository, reference, opts.signal)
    const byDigest = reference === digest
    const present = found !== undefined && (found.digest === digest || (byDigest && found.digest === undefined))
    if (present) log('manifest %s already in %s/%s as %s', digest, this.reference.registry, this.reference.repository, reference)
    return present
  }

  /**
   * Stores an instance of a list at once, by its digest (it is named by nothing yet). The
   * top-level manifest is checked and kept until {@link commit} pushes it under the reference's
   * tag (or digest, which MUST match), so nothing is visible under the name before then.
   */
  async putManifest(bytes: Buffer, instanceDigest?: Digest, opts: CallOptions = {}): Promise<void> {
    if (instanceDigest) {
      await pushManifest(this.client, this.reference.repository, instanceDigest, bytes, undefined, opts.signal)
      return
    }
    const want = this.reference.named.digest
    if (want && digestOf(bytes, digestAlgorithm(want)) !== want) {
      throw new ImageError('DIGEST_INVALID', `manifest for ${this.reference.stringWithinTransport()} hashes to ${digestOf(bytes)}, not ${want}`)
    }
    this.#pending = bytes
  }

  /** Pushes the top-level manifest given to putManifest; blobs and instances are already stored. */
  async commit(opts: CallOptions = {}): Promise<void> {
    if (!this.#pending) return
    await pushManifest(this.client, this.reference.repository, this.reference.manifestReference, this.#pending, undefined, opts.signal)
    this.#pending = undefined
  }

  /**
   * Starts finding the registry (its `/v2/` ping) while the copy still reads its source, and
   * with `hints.manifest` asks which manifest the reference names (for hasManifest). A failed
   * question is asked again when hasManifest needs the answer.
   */
  warmUp(hints: WarmUpHints = {}): void {
    this.client.warmUp()
    if (!hints.manifest || this.#early) return
    const stop = new AbortController()
    const answer = headManifest(this.client, this.reference.repository, this.reference.manifestReference, stop.signal).then(
      (found) => ({ found }),
      (err: unknown) => void log('early HEAD of %s failed: %s', this.reference.manifestReference, err),
    )
    this.#early = { answer, stop }
  }

  /** Drops an uncommitted manifest; uploaded blobs stay unreferenced for the registry's garbage collection. */
  async close(): Promise<void> {
    this.#pending = undefined
    this.#early?.stop.abort(new Error('the destination was closed'))
    this.client.abandonWarmUp()
  }
}
