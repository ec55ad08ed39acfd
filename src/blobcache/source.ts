// The read side of BlobCache: manifests and blobs come from the cache directory when it has
// them, then from the shared tier when there is one (fetched into the directory, verified), and
// from the wrapped source otherwise; layerInfosForCopy offers cached variants of layers;
// getBlobAt and getVerifiedBlobPath serve cached files directly.
import { open, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { type Readable, addAbortSignal, pipeline } from 'node:stream'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestOf, isDigest, parseDigest, verifyDigest } from '../digest.js'
import { errnoCode, isImageError } from '../errors.js'
import { manifestLayerInfos, readConfig, readManifest } from '../image.js'
import { MAX_MANIFEST_SIZE } from '../manifest.js'
import { guessMediaType } from '../media-types.js'
import type { BlobChunk, BlobInfo, CallOptions, ImageSource } from '../types.js'
import { type FoundBlob, entryIntact, findBlob } from './directory.js'
import { HIGH_WATER_MARK, READ_NOFOLLOW, fileSize, removeQuietly, touch } from './files.js'
import { fileRanges, streamRanges } from './ranges.js'
import type { BlobCache } from './reference.js'
import type { SharedTier } from './shared/tier.js'
import type { Counters } from './stats.js'
import { type TierFetched, fetchFromTier, manifestFromTier, prefetchSubstitutes } from './tier-reads.js'
import { type SubstitutionView, substituteLayer, tieredView } from './substitution.js'

const log = debug('blobcache:blobcache:source')

/**
 * An image source that reads through a {@link BlobCache}. A cache failure is logged, counted
 * and falls through to the wrapped source; it never fails a read the wrapped source can serve.
 * With a shared tier, a local miss is looked up there before the wrapped source is asked; a
 * blob found there is verified while it is written into the directory, then served from it
 * (counted as a hit).
 */
export class BlobCacheSource implements ImageSource {
  readonly #inner: ImageSource
  readonly #counters: Counters
  readonly #dir: string
  readonly #tier: SharedTier | undefined
  /** Hits already counted by getVerifiedBlobPath, so that a getBlob that follows is not counted twice. */
  readonly #pathHits = new Set<string>()
  /** Misses already counted by getLocalBlobPath, likewise. */
  readonly #localMisses = new Set<string>()

  /**
   * Present only when the wrapped source has it: the wrapped source's file of a blob, asked
   * after getVerifiedBlobPath found none in the cache; counted as a miss (once: a getBlob of
   * the same blob that follows is not counted again).
   */
  readonly getLocalBlobPath?: (info: BlobInfo, opts?: CallOptions) => Promise<string | undefined>

  constructor(
    readonly reference: BlobCache,
    inner: ImageSource,
    counters: Counters,
  ) {
    this.#inner = inner
    this.#counters = counters
    this.#dir = reference.directory
    this.#tier = reference.shared
    if (inner.getLocalBlobPath) this.getLocalBlobPath = (info, o) => this.#localBlobPath(info, o)
  }

  /** The wrapped source. */
  get inner(): ImageSource {
    return this.#inner
  }

  /**
   * With `instanceDigest`, returns the cached `<digest>` when its bytes hash to it (a hit), or
   * the shared tier's copy (fetched into the directory; a hit); otherwise (a miss) asks the
   * wrapped source. The top-level manifest always comes from the wrapped source.
   */
  async getManifest(instanceDigest?: Digest, opts: CallOptions = {}): Promise<{ bytes: Buffer; mediaType: string }> {
    if (instanceDigest) {
      const digest = parseDigest(instanceDigest)
      const path = join(this.#dir, digest)
      let absent = false
      try {
        const size = await fileSize(path)
        absent = size === undefined
        if (size !== undefined && size <= MAX_MANIFEST_SIZE) {
          const bytes = await readFile(path, { signal: opts.signal, flag: READ_NOFOLLOW })
          const mediaType = guessMediaType(bytes)
          if (digestOf(bytes, digestAlgorithm(digest)) !== digest) {
            await removeQuietly(path)
            absent = true
            this.#error(`cached manifest ${digest} is corrupt; removed`)
          } else if (mediaType !== '') {
            this.#counters.hit()
            await touch(path)
            log('manifest %s from the cache', digest)
            return { bytes, mediaType }
          }
        }
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason
        this.#error(`reading cached manifest ${digest}`, err)
      }
      if (absent && this.#tier) {
        const shared = await manifestFromTier(this.#tier, this.#dir, digest, opts, (what, err) => this.#error(what, err))
        if (shared) {
          this.#counters.hit()
          return shared
        }
      }
    }
    this.#counters.miss()
    return this.#inner.getManifest(instanceDigest, opts)
  }

  /**
   * Serves a cached blob (a hit) when its size matches `info.size` (or that is -1), else asks the
   * wrapped source (a miss). A cached stream is re-hashed as it is read: should the file have
   * been corrupted since it was written, the stream fails `DIGEST_INVALID` and the entry is
   * removed, so corrupt bytes never pass for the blob. A local miss is looked up in the shared
   * tier, whose blob is verified as it is fetched into the directory and then served from there.
   */
  async getBlob(info: BlobInfo, opts: CallOptions = {}): Promise<{ stream: Readable; size: number }> {
    opts.signal?.throwIfAborted()
    const found = await this.#find(info)
    if (found && info.digest) {
      const served = await this.#openCached(found, info, opts)
      if (served) return served
    }
    const fetched = await this.#fetchShared(info, opts)
    if (fetched) {
      const served = await this.#openFetched(fetched, opts)
      if (served) return served
    }
    if (!(info.digest && this.#localMisses.delete(info.digest))) this.#counters.miss()
    return this.#inner.getBlob(info, opts)
  }

  async #localBlobPath(info: BlobInfo, opts?: CallOptions): Promise<string | undefined> {
    const path = await this.#inner.getLocalBlobPath!(info, opts)
    if (path && info.digest && !this.#localMisses.has(info.digest)) {
      this.#counters.miss()
      this.#localMisses.add(info.digest)
    }
    return path
  }

  /** Forwards to the wrapped source. */
  getSignatures(instanceDigest?: Digest, opts?: CallOptions): Promise<Buffer[]> {
    return this.#inner.getSignatures(instanceDigest, opts)
  }

  /**
   * The layers to copy: the wrapped source's answer, or the manifest's layers, with cached
   * variants substituted according to the cache's mode (see {@link substituteLayer}). Signed
   * images are never substituted. Resolves undefined when nothing differs from the manifest.
   */
  async layerInfosForCopy(instanceDigest?: Digest, opts: CallOptions = {}): Promise<BlobInfo[] | undefined> {
    const base = this.#inner.layerInfosForCopy ? await this.#inner.layerInfosForCopy(instanceDigest, opts) : undefined
    const { compress, compressAlgorithm } = this.reference
    if (compress === 'preserve') return base
    if ((await this.#inner.getSignatures(instanceDigest, opts)).length > 0) {
      log('signed image: no substitution')
      return base
    }
    let layers = base
    if (!layers) {
      const m = await readManifest(this.#inner, instanceDigest, opts)
      if (m.kind !== 'image') return undefined
      layers = manifestLayerInfos(m.manifest)
    }
    // a decompressed form must be the config's diff ID for that layer, not whatever a note says
    const diffIDs = compress === 'decompress' ? await this.#diffIDs(instanceDigest, layers.length, opts) : []
    const view: string | SubstitutionView = this.#tier ? tieredView(this.#dir, this.#tier, opts.signal) : this.#dir
    const subs: (BlobInfo | undefined)[] = []
    for (const [i, layer] of layers.entries()) {
      try {
        subs.push(await substituteLayer(view, layer, compress, compressAlgorithm, diffIDs[i]))
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason
        this.#error(`reading the notes of ${layer.digest}`, err)
        subs.push(undefined)
      }
    }
    if (this.#tier) await prefetchSubstitutes(this.#tier, this.#dir, subs, opts, (what, err) => this.#error(what, err))
    let changed = false
    const out = layers.map((layer, i) => {
      const sub = subs[i]
      if (!sub) return layer
      log('substituting %s for %s (%s)', sub.digest, layer.digest, compress)
      changed = true
      return sub
    })
    return changed ? out : base
  }

  /**
   * Reads byte ranges of a blob, one stream per chunk, in order (length -1: to the end). Always
   * available: a cached blob is read from its file; otherwise the wrapped source's getBlobAt is
   * used, or, where it has none, the ranges are cut from its getBlob stream.
   */
  async *getBlobAt(info: BlobInfo, chunks: BlobChunk[], opts: CallOptions = {}): AsyncGenerator<Readable> {
    const found = (await this.#find(info)) ?? (await this.#fetchShared(info, opts))
    if (found) {
      this.#counters.hit()
      await touch(found.path)
      yield* fileRanges(found.path, chunks, opts)
      return
    }
    this.#counters.miss()
    if (this.#inner.getBlobAt) yield* this.#inner.getBlobAt(info, chunks, opts)
    else yield* streamRanges(async () => (await this.#inner.getBlob(info, opts)).stream, chunks, opts)
  }

  /**
   * The path of the cached file of a blob (a hit), whose bytes were verified when it was
   * written, so it may be copied with `fs.copyFile`; else, with a shared tier, the file just
   * fetched (and verified) from it; else the wrapped source's answer. The path MUST only be
   * read: it is the cache entry itself.
   */
  async getVerifiedBlobPath(info: BlobInfo, opts: CallOptions = {}): Promise<string | undefined> {
    const found = await this.#find(info)
    const usable = found && (await this.#intact(found, opts)) ? found : await this.#fetchShared(info, opts)
    if (usable) {
      this.#counters.hit()
      this.#pathHits.add(usable.name)
      await touch(usable.path)
      log('verified path of %s: %s', info.digest, usable.path)
      return usable.path
    }
    return this.#inner.getVerifiedBlobPath?.(info, opts)
  }

  /** Logs this source's counts and closes the wrapped source. */
  async close(): Promise<void> {
    const c = this.#counters
    log('closed %s: %d hits, %d misses, %d errors', imageNameOf(this.reference), c.hits, c.misses, c.errors)
    await this.#inner.close()
  }

  /**
   * The config's rootfs.diff_ids (read through the cache) when there is one per layer; [] when
   * they cannot be read, and the notes alone then decide.
   */
  async #diffIDs(instanceDigest: Digest | undefined, count: number, opts: CallOptions): Promise<(Digest | undefined)[]> {
    try {
      const m = await readManifest(this.#inner, instanceDigest, opts)
      if (m.kind !== 'image') return []
      const config = JSON.parse((await readConfig(this, m.manifest, opts)).toString('utf8')) as { rootfs?: { diff_ids?: unknown } } | null
      const ids = config?.rootfs?.diff_ids
      return Array.isArray(ids) && ids.length === count && ids.every(isDigest) ? ids : []
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason
      log('no diff IDs for the substitution checks: %s', (err as Error).message)
      return []
    }
  }

  /** The blob fetched from the shared tier into the directory, or undefined (see fetchFromTier). */
  #fetchShared(info: BlobInfo, opts: CallOptions): Promise<TierFetched | undefined> {
    if (!this.#tier) return Promise.resolve(undefined)
    return fetchFromTier(this.#tier, this.#dir, info, opts, (what, err) => this.#error(what, err))
  }

  /** Opens a blob just fetched (and verified) from the tier; undefined if it is gone already. */
  async #openFetched(fetched: TierFetched, opts: CallOptions): Promise<{ stream: Readable; size: number } | undefined> {
    let handle
    try {
      handle = await open(fetched.path, READ_NOFOLLOW)
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') this.#error(`opening ${fetched.name}`, err)
      return undefined
    }
    if (!this.#pathHits.delete(fetched.name)) this.#counters.hit()
    const stream = handle.createReadStream({ highWaterMark: HIGH_WATER_MARK })
    if (opts.signal) addAbortSignal(opts.signal, stream)
    return { stream, size: fetched.size }
  }

  /**
   * Whether a cached file may be handed out by path (the reader copies it unread): an entry
   * verified when it was named and not written to since carries a stamp and is taken at once;
   * any other is hashed first, and a corrupt one is removed (a miss). See stamp.ts.
   */
  async #intact(found: FoundBlob, opts: CallOptions): Promise<boolean> {
    try {
      if (await entryIntact(found.path, parseDigest(found.name.replace(/\.config$/, '')), opts)) return true
      await removeQuietly(found.path)
      this.#error(`cached ${found.name} is corrupt; removed`)
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason
      this.#error(`hashing ${found.name}`, err)
    }
    return false
  }

  async #find(info: BlobInfo): Promise<FoundBlob | undefined> {
    if (!info.digest) return undefined
    const digest = parseDigest(info.digest)
    try {
      return await findBlob(this.#dir, digest, info.size)
    } catch (err) {
      this.#error(`looking up ${digest}`, err)
      return undefined
    }
  }

  async #openCached(found: FoundBlob, info: BlobInfo, opts: CallOptions): Promise<{ stream: Readable; size: number } | undefined> {
    const digest = parseDigest(info.digest)
    let handle
    try {
      handle = await open(found.path, READ_NOFOLLOW)
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') this.#error(`opening ${found.name}`, err)
      return undefined
    }
    let size: number
    try {
      size = (await handle.stat()).size
      opts.signal?.throwIfAborted()
    } catch (err) {
      await handle.close()
      throw err
    }
    if (info.size >= 0 && size !== info.size) {
      await handle.close()
      await removeQuietly(found.path)
      return undefined
    }
    if (!this.#pathHits.delete(found.name)) this.#counters.hit()
    await touch(found.path)
    log('blob %s from the cache (%d bytes)', digest, size)
    const file = handle.createReadStream({ highWaterMark: HIGH_WATER_MARK })
    const verified = verifyDigest({ expected: digest, size })
    pipeline(file, verified, (err) => {
      if (err && (isImageError(err, 'DIGEST_INVALID') || isImageError(err, 'SIZE_INVALID'))) {
        this.#error(`cached ${found.name} is corrupt; removed`, err)
        removeQuietly(found.path).catch(() => {})
      }
    })
    if (opts.signal) addAbortSignal(opts.signal, verified)
    return { stream: verified, size }
  }

  #error(what: string, err?: unknown): void {
    this.#counters.error()
    log('cache error: %s%s', what, err ? `: ${(err as Error).message}` : '')
  }
}

/** `transport:reference` of a reference, without importing the transport registry. */
export function imageNameOf(ref: { transport: { name: string }; stringWithinTransport(): string }): string {
  return `${ref.transport.name}:${ref.stringWithinTransport()}`
}
