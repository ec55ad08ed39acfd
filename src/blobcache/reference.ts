// BlobCache: an ImageReference that wraps another one and keeps a content-addressed cache of
// the blobs written to it and read from it, in a directory shared (byte for byte) with
// containers/image's blob cache (buildah --blob-cache).
import debug from 'debug'
import { type Digest, parseDigest } from '../digest.js'
import { ImageError } from '../errors.js'
import type { NamedReference } from '../name.js'
import { blobLocations } from '../registry/locations.js'
import type {
  BlobInfo,
  CallOptions,
  CompressionAlgorithm,
  ImageDestination,
  ImageReference,
  ImageSource,
  ImageTransport,
  LayerCompression,
  SystemContext,
} from '../types.js'
import { BlobCacheDestination } from './destination.js'
import { CacheDirectory, type PruneOptions, type PruneResult, type VerifyResult, findBlob } from './directory.js'
import { BlobCacheSource, imageNameOf } from './source.js'
import { type FlushProgress, SharedTier, type SharedStats, type SharedTierOptions } from './shared/tier.js'
import { type CacheStats, Counters, emptySharedStats } from './stats.js'

const log = debug('blobcache:blobcache:reference')

/** Options of {@link BlobCache}. */
export interface BlobCacheOptions {
  /**
   * The algorithm of the compressed variants the cache makes and substitutes in `compress` mode.
   * Default `gzip`. Ignored in the other modes.
   */
  compressAlgorithm?: CompressionAlgorithm
  /**
   * A second, shared tier behind the directory: a repository on an OCI registry
   * (`docker://host[:port]/repo`, no tag or digest), or a {@link SharedTier} to share with other
   * caches. A local miss then looks there before the wrapped source, and every blob that enters
   * the directory is pushed there in the background (see {@link BlobCache.flush}). Default:
   * none, and the cache behaves exactly as without this option.
   */
  shared?: string | SharedTier
  /** Options of the tier made from a `shared` string (registry credentials, TLS, queue bounds). Default: the tier's. */
  sharedOptions?: SharedTierOptions
}

/** Options of {@link BlobCache.flush}. */
export interface FlushOptions {
  /** Aborting drops the uploads still queued (counted in `dropped`); flush still resolves. */
  signal?: AbortSignal
  /** Called after each finished upload job. */
  onProgress?: (p: FlushProgress) => void
}

const MODES: readonly LayerCompression[] = ['preserve', 'compress', 'decompress']

/** How many compressed variants one cache makes at once in the background. */
const BACKGROUND_CONCURRENCY = 2

/**
 * Wraps an image reference with a blob cache in `directory` (which the cache never creates).
 *
 * - Writing through it (`newImageDestination`) stores every verified blob under its digest,
 *   the decompressed form of compressed layers, notes linking the two, and manifests.
 * - Reading through it (`newImageSource`) serves manifests and blobs from the cache when it has
 *   them; with `compress` or `decompress`, `layerInfosForCopy` substitutes cached variants.
 * - The cache never fails a copy: its own failures are logged and counted in {@link stats}.
 * - With a `shared` tier, local misses are looked up in the tier (verified, kept in the
 *   directory) and new entries are pushed to it in the background; {@link flush} waits for them.
 *
 * Its name is the wrapped reference's: `transport`, `stringWithinTransport()`,
 * `dockerReference()` and `deleteImage()` are forwarded.
 */
export class BlobCache implements ImageReference {
  /** The cache directory, as given. */
  readonly directory: string
  /** What `layerInfosForCopy` does to layers. */
  readonly compress: LayerCompression
  /** The algorithm of variants made and substituted in `compress` mode. */
  readonly compressAlgorithm: CompressionAlgorithm
  /** The shared tier behind the directory, if any. */
  readonly shared: SharedTier | undefined
  readonly #ref: ImageReference
  readonly #counters = new Counters()
  #running = 0
  readonly #queue: (() => void)[] = []

  /**
   * Throws `CACHE_INVALID` for an empty `directory`, an unknown `compress` mode or an unknown
   * `compressAlgorithm`, and `REFERENCE_INVALID` for a malformed `shared` name.
   */
  constructor(ref: ImageReference, directory: string, compress: LayerCompression = 'preserve', opts: BlobCacheOptions = {}) {
    if (!directory) {
      throw new ImageError('CACHE_INVALID', `error creating cache around reference "${imageNameOf(ref)}": no directory specified`)
    }
    if (!MODES.includes(compress)) throw new ImageError('CACHE_INVALID', `unhandled LayerCompression value ${JSON.stringify(compress)}`)
    const alg = opts.compressAlgorithm ?? 'gzip'
    if (alg !== 'gzip' && alg !== 'zstd') throw new ImageError('CACHE_INVALID', `unknown compression algorithm ${JSON.stringify(alg)}`)
    this.#ref = ref
    this.directory = directory
    this.compress = compress
    this.compressAlgorithm = alg
    this.shared = typeof opts.shared === 'string' ? new SharedTier(opts.shared, opts.sharedOptions) : opts.shared
  }

  /** The wrapped reference. */
  get inner(): ImageReference {
    return this.#ref
  }

  /** The wrapped reference's transport. */
  get transport(): ImageTransport {
    return this.#ref.transport
  }

  /** The wrapped reference's name within its transport. */
  stringWithinTransport(): string {
    return this.#ref.stringWithinTransport()
  }

  /** The wrapped reference's docker reference. */
  dockerReference(): NamedReference | undefined {
    return this.#ref.dockerReference()
  }

  /** Deletes the wrapped image; the cache keeps its entries. */
  deleteImage(ctx?: SystemContext): Promise<void> {
    return this.#ref.deleteImage(ctx)
  }

  /** Opens the wrapped image for reading, through the cache. */
  async newImageSource(ctx?: SystemContext): Promise<ImageSource> {
    const inner = await this.#ref.newImageSource(ctx)
    log('source %s (cache %s, %s)', imageNameOf(this), this.directory, this.compress)
    return new BlobCacheSource(this, inner, new Counters(this.#counters))
  }

  /** Opens the wrapped image for writing, through the cache. */
  async newImageDestination(ctx?: SystemContext): Promise<ImageDestination> {
    const inner = await this.#ref.newImageDestination(ctx)
    log('destination %s (cache %s)', imageNameOf(this), this.directory)
    return new BlobCacheDestination(this, inner, new Counters(this.#counters))
  }

  /**
   * Hits, misses and errors of every source and destination opened from this cache (a blob
   * served from the shared tier is a hit), and with a tier its own counts under `shared`
   * (shared by every cache using that tier).
   */
  get stats(): CacheStats {
    const stats = this.#counters.snapshot()
    if (this.shared) stats.shared = this.shared.stats
    return stats
  }

  /**
   * Waits until every entry queued for the shared tier has been pushed (or has failed, or was
   * dropped) and resolves the tier's counts; without a tier, resolves all-zero counts at once.
   * Never rejects. A process that used a tier SHOULD call it before exiting, or the uploads
   * still queued are lost (the copy itself is complete either way).
   */
  flush(opts: FlushOptions = {}): Promise<SharedStats> {
    return this.shared ? this.shared.flush(opts) : Promise.resolve(emptySharedStats())
  }

  /**
   * Queues the entry `name` of the directory for the shared tier (nothing without one). With
   * `fromInner`, the blob was just stored in, or found in, the wrapped reference, which the tier
   * may mount it from when it is a repository of the same registry.
   * @internal
   */
  share(name: string, opts: { kind?: 'manifest'; fromInner?: boolean } = {}): void {
    const tier = this.shared
    if (!tier) return
    try {
      const digest = parseDigest(name.replace(/\.config$/, ''))
      const mountFrom = this.#mountSource(tier, digest, opts.fromInner === true)
      tier.enqueue(this.directory, name, { ...(opts.kind ? { kind: opts.kind } : {}), ...(mountFrom ? { mountFrom } : {}) })
    } catch (err) {
      log('not sharing %s: %s', name, (err as Error).message)
    }
  }

  /**
   * A repository of the tier's registry known to hold `digest`: the wrapped reference's (when
   * the blob went through it), else one the registry client saw it in (a source's manifest).
   */
  #mountSource(tier: SharedTier, digest: Digest, fromInner: boolean): string | undefined {
    if (fromInner && this.#ref.transport.name === 'docker') {
      const named = this.#ref.dockerReference()
      if (named && named.domain === tier.registry && named.path !== tier.repository) return named.path
    }
    return blobLocations(digest, tier.registry, tier.repository)[0]
  }

  /**
   * Whether the cache holds the blob (`<digest>`, then `<digest>.config`). `info.size` -1
   * matches any size; an entry of another size is corrupt and removed. No digest: not present.
   * An invalid digest throws `DIGEST_INVALID`.
   */
  async hasBlob(info: BlobInfo): Promise<{ present: true; size: number } | { present: false }> {
    if (!info.digest) return { present: false }
    const found = await findBlob(this.directory, parseDigest(info.digest), info.size)
    return found ? { present: true, size: found.size } : { present: false }
  }

  /** Removes every entry of the cache directory and keeps the directory. `CACHE_INVALID` if it is missing. */
  clearCache(): Promise<void> {
    return new CacheDirectory(this.directory).clear()
  }

  /** Evicts least-recently-used entries; see {@link CacheDirectory.prune}. */
  prune(opts: PruneOptions = {}): Promise<PruneResult> {
    return new CacheDirectory(this.directory).prune(opts)
  }

  /** Re-hashes every entry and removes corrupt ones; see {@link CacheDirectory.verify}. */
  verify(opts: CallOptions = {}): Promise<VerifyResult> {
    return new CacheDirectory(this.directory).verify(opts)
  }

  /**
   * Runs cache work (compressed variants) in the background, a few tasks at a time per cache.
   * @internal
   */
  runInBackground<T>(task: () => Promise<T>): Promise<T> {
    return new Promise<void>((resolve) => {
      if (this.#running < BACKGROUND_CONCURRENCY) {
        this.#running++
        resolve()
      } else this.#queue.push(resolve)
    })
      .then(task)
      .finally(() => {
        const next = this.#queue.shift()
        if (next) next()
        else this.#running--
      })
  }
}

/**
 * Returns a function that wraps references in a {@link BlobCache} on `directory`, for copy tools
 * (buildah's `CacheLookupReferenceFunc`). The arguments are checked at once: `CACHE_INVALID`,
 * and `REFERENCE_INVALID` for a malformed `shared` name. Every cache it makes uses ONE shared
 * tier (made here from a `shared` string), so uploads are deduplicated and flushed together:
 * flushing any of them flushes all.
 */
export function cacheLookupReferenceFunc(
  directory: string,
  compress: LayerCompression = 'preserve',
  opts: BlobCacheOptions = {},
): (ref: ImageReference) => BlobCache {
  if (!directory) throw new ImageError('CACHE_INVALID', 'error using blobcache: no directory specified')
  if (!MODES.includes(compress)) throw new ImageError('CACHE_INVALID', `unhandled LayerCompression value ${JSON.stringify(compress)}`)
  // The algorithm too, as documented ("checked at once"): before, a bad one only failed when
  // the first reference was wrapped, in the middle of the copy tool's work.
  const alg = opts.compressAlgorithm ?? 'gzip'
  if (alg !== 'gzip' && alg !== 'zstd') throw new ImageError('CACHE_INVALID', `unknown compression algorithm ${JSON.stringify(alg)}`)
  const shared = typeof opts.shared === 'string' ? new SharedTier(opts.shared, opts.sharedOptions) : opts.shared
  const options: BlobCacheOptions = { ...opts, shared }
  return (ref) => new BlobCache(ref, directory, compress, options)
}
