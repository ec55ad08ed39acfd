// ImageCache: linuxkit's CacheProvider over an OCI image layout, without its bugs. Names are
// normalised (`alpine` and `docker.io/library/alpine:latest` are one key); pulls fetch only the
// requested platforms and only missing blobs, and work offline when all is there; index.json is
// replaced atomically under a cross-process lock held only while it is rewritten; blobs shared
// by other names are never deleted.
import type { Readable } from 'node:stream'
import { resolve } from 'node:path'
import debug from 'debug'
import { type Digest, parseDigest } from '../digest.js'
import { ImageError } from '../errors.js'
import { type Descriptor, type ImageIndex, type Platform, checkDescriptor, currentPlatform } from '../manifest.js'
import { isIndexMediaType, MediaType } from '../media-types.js'
import { hasBlob, openVerifiedBlob, readManifestBlob, writeBlobBytes } from './blobs.js'
import { type GcOptions, type GcReport, collectGarbage, removeEverything, removeRoots, removeUnreferenced } from './gc.js'
import { initLayout, readIndex, updateIndex } from './index-file.js'
import { loadArchive, rootStillPresent } from './load.js'
import type { FileLockOptions } from '../file-lock.js'
import { mergeEntries } from './merge.js'
import { findEntry, isNamed, withEntry } from './entries.js'
import { type CacheName, REF_NAME, cacheName, entryName } from './names.js'
import { type PlatformLike, toPlatform } from './platforms.js'
import { checkLocal, pullFromRegistry, registryOffers } from './pull.js'
import { type PushResult, pushRoot } from './push.js'
import { Remote, type RemoteOptions } from './remote.js'
import { CachedImage } from './source.js'
import { ContentStore } from './store.js'

const log = debug('blobcache:image-cache')

/** Options of {@link ImageCache.open}. */
export interface ImageCacheOptions {
  /** Registry settings for pulls and pushes (TLS, credentials, retries). Default: verified TLS, auth files. */
  registry?: RemoteOptions
  /** How long to wait for the index lock, and when to break it. Defaults: see {@link FileLockOptions}. */
  lock?: Omit<FileLockOptions, 'signal'>
}

/** Options every method accepts. */
export interface CacheCallOptions {
  signal?: AbortSignal
}

/** Options of {@link ImageCache.imagePull}. */
export interface PullOptions extends CacheCallOptions {
  /** Platforms to fetch. Default: the running platform. */
  platforms?: PlatformLike[]
  /** Ask the registry even when the cache holds the image whole. Default false. */
  alwaysPull?: boolean
  /** Registry settings for this call. Default: the cache's. */
  registry?: RemoteOptions
  /** Layers downloaded at once. Default 6. */
  concurrency?: number
}

/** One named image of the cache. */
export interface ImageCacheEntry {
  /** The canonical name (`docker.io/library/alpine:3.19`). */
  name: string
  descriptor: Descriptor
}

/** Options of {@link ImageCache.push}. */
export interface CachePushOptions extends CacheCallOptions {
  /** The name to push to. Default: the local name. */
  remoteName?: string
  /** Also tag each platform's manifest `<tag>-<arch>`. Default false. */
  archTags?: boolean
  /** Replace (for an index: merge into) an existing remote tag. Default false. */
  override?: boolean
  registry?: RemoteOptions
}

/** An OCI image layout used as an image cache, with linuxkit's CacheProvider methods. */
export class ImageCache {
  /** The cache directory (absolute). */
  readonly dir: string
  readonly #opts: ImageCacheOptions

  private constructor(dir: string, opts: ImageCacheOptions) {
    this.dir = dir
    this.#opts = opts
  }

  /**
   * Creates or opens the cache at `dir`: an OCI layout whose index.json names roots by
   * `org.opencontainers.image.ref.name` = the full reference. An existing cache is not
   * rewritten; a corrupt one fails `CACHE_INVALID` and is never replaced.
   */
  static async open(dir: string, opts: ImageCacheOptions = {}): Promise<ImageCache> {
    const root = resolve(dir)
    await initLayout(root, opts.lock)
    return new ImageCache(root, opts)
  }

  #lock(signal?: AbortSignal): FileLockOptions {
    return { ...this.#opts.lock, signal }
  }

  #remote(name: CacheName, registry?: RemoteOptions): Remote {
    return new Remote(name.ref, registry ?? this.#opts.registry)
  }

  /** A remote for reading `name`: registries.conf's mirrors and remapped locations apply. */
  #reader(name: CacheName, registry?: RemoteOptions): Promise<Remote> {
    return Remote.forReading(name.ref, registry ?? this.#opts.registry)
  }

  /** index.json as it is now (validated). */
  async index(opts: CacheCallOptions = {}): Promise<ImageIndex> {
    return readIndex(this.dir, opts)
  }

  /**
   * The root descriptor `ref` names, or null. A reference with a digest matches a root of that
   * digest whatever its name (a child manifest is not a root); otherwise the canonical name is
   * looked up. Throws `REFERENCE_INVALID` for a malformed reference.
   */
  async findDescriptor(ref: string, opts: CacheCallOptions = {}): Promise<Descriptor | null> {
    const name = cacheName(ref)
    return findEntry(await this.index(opts), name) ?? null
  }

  /** Every named root, sorted by name. */
  async list(opts: CacheCallOptions = {}): Promise<ImageCacheEntry[]> {
    const out: ImageCacheEntry[] = []
    for (const d of (await this.index(opts)).manifests) {
      const name = entryName(d)
      if (name !== undefined) out.push({ name, descriptor: d })
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
  }

  /**
   * Pulls `ref` for `platforms` (default: the running one). Unless `alwaysPull`, a cache that
   * holds the image whole for those platforms is used without any request. Otherwise one
   * manifest request resolves the name, and only what the cache lacks is fetched: manifests
   * and configs are checked whole, layers by size, so missing or truncated blobs are repaired.
   * Other platforms' blobs are never fetched. Fails `PLATFORM_UNKNOWN` (index.json unchanged)
   * when the image does not offer a platform. Resolves the root descriptor now named `ref`.
   */
  async imagePull(ref: string, opts: PullOptions = {}): Promise<Descriptor> {
    const name = cacheName(ref)
    const platforms = (opts.platforms?.length ? opts.platforms : [currentPlatform()]).map(toPlatform)
    if (!opts.alwaysPull) {
      const found = findEntry(await this.index(opts), name)
      if (found) {
        const sel = await checkLocal(this.dir, found, platforms)
        if (sel.absent.length === 0 && sel.missing.length === 0) {
          log('pull %s: cached (%s), no request', name.key, found.digest)
          return entryName(found) === name.key ? found : this.descriptorWrite(name.key, found, opts)
        }
        log('pull %s: cache incomplete: %s', name.key, [...sel.missing, ...sel.absent.map((p) => `platform ${p.os}/${p.architecture}`)].join('; '))
      }
    }
    const remote = await this.#reader(name, opts.registry)
    for (let attempt = 1; ; attempt++) {
      const pulled = await pullFromRegistry(this.dir, remote, platforms, opts)
      const named = await updateIndex(this.dir, async (index) => {
        // a concurrent remove or gc may have taken blobs this pull found present: check again
        for (const b of pulled.blobs) if (!(await hasBlob(this.dir, b))) return { result: undefined }
        const next = withEntry(index, name.key, pulled.root)
        return { index: next, result: findEntry(next, name) }
      }, this.#lock(opts.signal))
      if (named) return named
      if (attempt >= 3) throw new ImageError('CACHE_INVALID', `pull of ${name.key}: blobs kept disappearing (a concurrent remove or gc?)`)
      log('pull %s: blobs vanished before naming, pulling again', name.key)
    }
  }

  /**
   * Checks that the cache holds `ref` whole for `platform` (default: the running one): its
   * manifests and config intact, its layers of the right size (hashed with `verify`). Resolves
   * what is missing; no network, nothing written.
   */
  async checkImage(ref: string, platform?: PlatformLike, opts: CacheCallOptions & { verify?: boolean } = {}): Promise<{ complete: boolean; missing: string[]; descriptor?: Descriptor }> {
    const name = cacheName(ref)
    const found = findEntry(await this.index(opts), name)
    if (!found) return { complete: false, missing: [`image ${name.key} not found in the cache`] }
    const want = toPlatform(platform ?? currentPlatform())
    const sel = await checkLocal(this.dir, found, [want], { verifyLayers: opts.verify })
    const missing = [...sel.absent.map((p) => `platform ${[p.os, p.architecture, p.variant].filter(Boolean).join('/')} not in ${name.key}`), ...sel.missing]
    return { complete: missing.length === 0, missing, descriptor: found }
  }

  /** True when the cache holds `ref` whole for `platform` (see {@link checkImage}). */
  async imageInCache(ref: string, platform?: PlatformLike, opts: CacheCallOptions & { verify?: boolean } = {}): Promise<boolean> {
    return (await this.checkImage(ref, platform, opts)).complete
  }

  /**
   * True when the registry has `ref` for `platform` (default: the running one); false when it
   * has no such manifest or repository, or only other platforms. Network and auth failures reject.
   */
  async imageInRegistry(ref: string, platform?: PlatformLike, opts: CacheCallOptions & { registry?: RemoteOptions } = {}): Promise<boolean> {
    const name = cacheName(ref)
    return registryOffers(await this.#reader(name, opts.registry), toPlatform(platform ?? currentPlatform()), opts.signal)
  }

  /**
   * Names `descriptor` (a manifest or index the cache holds) `name`, replacing any entry of that
   * name in one atomic rewrite. Other annotations and the platform are kept; the caller's object
   * is not changed. Fails `REFERENCE_INVALID` for an empty name, `BLOB_UNKNOWN` when the blob is
   * not in the cache.
   */
  async descriptorWrite(name: string, descriptor: Descriptor, opts: CacheCallOptions = {}): Promise<Descriptor> {
    const n = cacheName(name)
    const d = checkDescriptor(structuredClone(descriptor), 'descriptor')
    if (!(await hasBlob(this.dir, d))) throw new ImageError('BLOB_UNKNOWN', `cannot name ${n.key}: blob ${d.digest} is not in the cache`)
    return updateIndex(this.dir, async (index) => {
      if (!(await hasBlob(this.dir, d))) throw new ImageError('BLOB_UNKNOWN', `cannot name ${n.key}: blob ${d.digest} is not in the cache`)
      const next = withEntry(index, n.key, d)
      return { index: next, result: findEntry(next, n)! }
    }, this.#lock(opts.signal))
  }

  /**
   * Creates or updates the index named `ref` with `descriptors` (manifests the cache holds).
   * A new name gets an index of exactly those entries, in that order. An existing index keeps
   * its entries except those replaced by platform (variant included); new platforms are
   * appended in the order given; attestations of replaced images are dropped. The old index
   * blob is deleted only when no other name uses it. Fails when no descriptor is given, when
   * `ref` names an image rather than an index, or when a descriptor's blob is missing.
   */
  async indexWrite(ref: string, descriptors: Descriptor[], opts: CacheCallOptions = {}): Promise<Descriptor> {
    const name = cacheName(ref)
    if (!descriptors.length) throw new ImageError('MANIFEST_INVALID', `indexWrite ${name.key}: at least one descriptor is needed`)
    const adds = descriptors.map((d, i) => checkDescriptor(structuredClone(d), `descriptors[${i}]`))
    for (const d of adds) {
      const { [REF_NAME]: _n, ...rest } = d.annotations ?? {}
      d.annotations = Object.keys(rest).length ? rest : undefined
      if (d.annotations === undefined) delete d.annotations
      if (!(await hasBlob(this.dir, d))) throw new ImageError('BLOB_UNKNOWN', `indexWrite ${name.key}: blob ${d.digest} is not in the cache`)
    }
    let old: Descriptor | undefined
    const written = await updateIndex(this.dir, async (index) => {
      old = findEntry(index, name)
      let base: Descriptor[] = []
      let mediaType: string = MediaType.ociIndex
      if (old) {
        if (!isIndexMediaType(old.mediaType)) throw new ImageError('UNSUPPORTED', `indexWrite ${name.key}: the name is an image (${old.mediaType}), not an index`)
        const parsed = await readManifestBlob(this.dir, old)
        if (parsed.kind !== 'index') throw new ImageError('UNSUPPORTED', `indexWrite ${name.key}: ${old.digest} is not an index`)
        base = parsed.index.manifests
        mediaType = parsed.mediaType
      }
      const manifests = mergeEntries(base, adds)
      if (mediaType === MediaType.dockerManifestList && manifests.some((d) => d.mediaType.startsWith('application/vnd.oci.'))) mediaType = MediaType.ociIndex
      const bytes = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType, manifests }))
      const digest = await writeBlobBytes(this.dir, bytes)
      const next = withEntry(index, name.key, { mediaType, digest, size: bytes.length })
      const previous = old && old.digest !== digest ? old : undefined
      return {
        index: next,
        result: findEntry(next, name)!,
        after: async () => previous && removeUnreferenced(this.dir, [previous.digest], next.manifests),
      }
    }, this.#lock(opts.signal))
    log('indexWrite %s: %s -> %s', name.key, old?.digest ?? 'new', written.digest)
    return written
  }

  /**
   * Reads an OCI image tar from `stream` (see loadArchive) and names each entry of its
   * index.json that carries `io.containerd.image.name` or `org.opencontainers.image.ref.name`.
   * The index lock is taken only for the final update. Resolves the archive's entries.
   */
  async imageLoad(stream: Readable | AsyncIterable<Buffer>, opts: CacheCallOptions = {}): Promise<Descriptor[]> {
    const loaded = await loadArchive(this.dir, stream, opts)
    if (loaded.named.size) {
      await updateIndex(this.dir, async (index) => {
        let next = index
        for (const [key, d] of loaded.named) {
          if (!(await rootStillPresent(this.dir, d))) throw new ImageError('CACHE_INVALID', `import of ${key}: its blobs were removed while it was imported (a concurrent gc?); import it again`)
          next = withEntry(next, key, d)
        }
        return { index: next, result: undefined }
      }, this.#lock(opts.signal))
    }
    return loaded.descriptors
  }

  /**
   * Pushes the image or index named `name` to `remoteName` (default: the same name). See
   * {@link pushRoot} for override, merging and arch tags. The local index.json is not changed.
   */
  async push(name: string, opts: CachePushOptions = {}): Promise<PushResult> {
    const local = cacheName(name)
    const root = findEntry(await this.index(opts), local)
    if (!root) throw new ImageError('MANIFEST_UNKNOWN', `push: ${local.key} is not in the cache`)
    const target = cacheName(opts.remoteName ?? name)
    return pushRoot(this.dir, root, this.#remote(target, opts.registry), target.ref.tag, opts)
  }

  /**
   * Opens `ref` for `platform` (default: the running one), pinned to the digests it resolves to
   * now. Fails `MANIFEST_UNKNOWN` when the cache does not have it, `PLATFORM_UNKNOWN` when the
   * image does not offer the platform, `BLOB_UNKNOWN` when blobs are missing.
   */
  async newSource(ref: string, platform?: PlatformLike, opts: CacheCallOptions = {}): Promise<CachedImage> {
    const name = cacheName(ref)
    const root = findEntry(await this.index(opts), name)
    if (!root) throw new ImageError('MANIFEST_UNKNOWN', `${name.key} is not in the cache`)
    const want: Platform = toPlatform(platform ?? currentPlatform())
    const sel = await checkLocal(this.dir, root, [want], { attestations: 'optional' })
    if (sel.absent.length) throw new ImageError('PLATFORM_UNKNOWN', `${name.key} has no image for ${[want.os, want.architecture, want.variant].filter(Boolean).join('/')}`)
    if (sel.missing.length || !sel.images[0]) throw new ImageError('BLOB_UNKNOWN', `${name.key} is not complete in the cache: ${sel.missing.join('; ')}`)
    return new CachedImage(this.dir, entryName(root) ?? name.key, root, want, sel.images[0])
  }

  /** A blob of the cache, verified as it streams (the stream fails on a mismatch); `BLOB_UNKNOWN` if absent. */
  async getContent(digest: Digest | string, opts: CacheCallOptions = {}): Promise<Readable> {
    return (await openVerifiedBlob(this.dir, parseDigest(digest), opts)).stream
  }

  /** The content store over the cache's blobs (ingest, commit, info, list, delete). */
  store(): ContentStore {
    return new ContentStore(this.dir)
  }

  /**
   * Removes the name `ref` and the blobs only it used (reference counted: a blob another name
   * reaches stays). Resolves false, changing nothing, when no such name exists.
   */
  async remove(ref: string, opts: CacheCallOptions = {}): Promise<boolean> {
    const name = cacheName(ref)
    return updateIndex(this.dir, async (index) => {
      const gone = index.manifests.filter((d) => isNamed(d, name.key))
      if (!gone.length) return { result: false }
      const next = { ...index, manifests: index.manifests.filter((d) => !gone.includes(d)) }
      return { index: next, result: true, after: () => removeRoots(this.dir, gone, next.manifests) }
    }, this.#lock(opts.signal))
  }

  /**
   * Removes blobs no name reaches that are older than `graceMs`, temporary files and abandoned
   * ingests; with `verify`, also hashes every blob and removes damaged ones.
   */
  async gc(opts: GcOptions = {}): Promise<GcReport> {
    return collectGarbage(this.dir, { ...opts, lock: this.#lock(opts.signal) })
  }

  /**
   * Removes names and their blobs: every name, or with `publishedOnly` only those whose
   * registry tag resolves to the same digest (a registry that cannot be asked keeps the name).
   * Resolves the names removed.
   */
  async clean(opts: CacheCallOptions & { publishedOnly?: boolean; registry?: RemoteOptions } = {}): Promise<string[]> {
    if (!opts.publishedOnly) return removeEverything(this.dir, this.#lock(opts.signal))
    const removed: string[] = []
    for (const { name, descriptor } of await this.list(opts)) {
      let remoteDigest: Digest | undefined
      try {
        const n = cacheName(name)
        remoteDigest = (await this.#remote(n, opts.registry).manifestIfExists(n.digest ?? n.ref.tag ?? 'latest', opts.signal))?.digest
      } catch (err) {
        log('clean: cannot ask the registry about %s: %s', name, (err as Error).message)
      }
      if (remoteDigest !== descriptor.digest) continue
      if (await this.remove(name, opts)) removed.push(name)
    }
    return removed
  }
}
