// The write side of BlobCache: blobs written to the wrapped destination are teed into the cache,
// or, when it takes local files, written once into the cache and handed to it (verified before
// they are named either way); compressed layers are decompressed alongside, manifests are stored
// under their digest, and tryReusingBlob can supply a blob the wrapped destination lacks from
// the cache (or from the shared tier). Every entry stored or found here is also queued for the
// shared tier, when the cache has one.
import { createReadStream } from 'node:fs'
import { lstat, open, rename, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { type Readable, Writable, pipeline } from 'node:stream'
import { pipeline as pipelinePromise } from 'node:stream/promises'
import debug from 'debug'
import { type Digest, type DigestingStream, digestOf, digestingStream, parseDigest } from '../digest.js'
import { errnoCode, isImageError } from '../errors.js'
import { DirectWriter } from '../io/direct-write.js'
import { layerCompressionOf } from '../manifest.js'
import type { BlobInfo, CallOptions, ImageDestination, LayerCompression, PutBlobOptions } from '../types.js'
import { entryIntact, findBlob } from './directory.js'
import { FILE_MODE, HIGH_WATER_MARK, atomicWriteFile, entryName, fileExists, removeQuietly, tempPath, touch } from './files.js'
import type { BlobCache } from './reference.js'
import type { Counters } from './stats.js'
import { CacheTee, type CacheTeeOptions, CacheWriter, type TeeOutcome } from './tee.js'
import { putThroughFile } from './through-file.js'
import { type TierFetched, fetchFromTier } from './tier-reads.js'
import { makeCompressedVariant, storeDecompressed } from './variants.js'
import { copyLocalFile, openLocalBlob } from './local-file.js'
import { stampVerified } from './stamp.js'

/** Blobs from this size on (or of unknown size) are written to the cache with direct I/O (see direct-write.ts). */
const DIRECT_MIN_BYTES = 1 << 20

const log = debug('blobcache:blobcache:destination')

/**
 * An image destination that writes through a {@link BlobCache}. Every failure of the cache is
 * logged and counted, never thrown: the wrapped destination's outcome is the call's outcome.
 * With a shared tier, each entry it stores or finds already cached (blobs, decompressed forms,
 * compressed variants, manifests) is queued for upload there (write-behind; see
 * {@link BlobCache.flush}).
 */
export class BlobCacheDestination implements ImageDestination {
  readonly #inner: ImageDestination
  readonly #counters: Counters
  readonly #dir: string
  /** Whether the wrapped destination hard-links files from the cache directory (see #mayWriteDirect). */
  #linksCacheFiles: Promise<boolean> | undefined
  readonly #background = new Set<Promise<unknown>>()

  /** Present only when the wrapped destination has it: stores signatures there. */
  readonly putSignatures?: (signatures: Buffer[], instanceDigest?: Digest, opts?: CallOptions) => Promise<void>
  /**
   * Present only when the wrapped destination has it: stores a blob from a verified local file
   * there, and copies the file into the cache (re-hashed) when the cache lacks it.
   */
  readonly putBlobFromFile?: (path: string, info: BlobInfo, opts?: PutBlobOptions) => Promise<BlobInfo>
  /**
   * Present only when the wrapped destination has putBlobFromFile: stores a blob from the
   * source's own local file, which is read once, on a decompression thread (see local-file.ts),
   * verified, and given to putBlobFromFile; the entry and its decompressed form are named as
   * putBlob names them. Small blobs, and bzip2 and xz layers, are streamed
   * through putBlob instead.
   */
  readonly putBlobFromLocalFile?: (path: string, info: BlobInfo, opts?: PutBlobOptions) => Promise<BlobInfo>

  constructor(
    readonly reference: BlobCache,
    inner: ImageDestination,
    counters: Counters,
  ) {
    this.#inner = inner
    this.#counters = counters
    this.#dir = reference.directory
    if (inner.putSignatures) this.putSignatures = (sigs, d, o) => inner.putSignatures!(sigs, d, o)
    if (inner.putBlobFromFile) {
      this.putBlobFromFile = (path, info, o) => this.#putBlobFromFile(path, info, o)
      this.putBlobFromLocalFile = (path, info, o) => this.#putBlobFromLocalFile(path, info, o)
    }
  }

  /** The wrapped destination. */
  get inner(): ImageDestination {
    return this.#inner
  }

  /** Forwards to the wrapped destination. */
  supportedManifestMIMETypes(): string[] | undefined {
    return this.#inner.supportedManifestMIMETypes()
  }

  /** Forwards to the wrapped destination. */
  desiredLayerCompression(): LayerCompression {
    return this.#inner.desiredLayerCompression()
  }

  /** Forwards to the wrapped destination. */
  acceptsImageLists(): boolean {
    return this.#inner.acceptsImageLists()
  }

  /**
   * Forwards to the wrapped destination, when it has warmUp, without hints: the cache has no
   * hasManifest (every copy through it writes, so the cache sees what it is given).
   */
  warmUp(): void {
    this.#inner.warmUp?.()
  }

  /**
   * Stores the blob in the wrapped destination and tees it into the cache. The entry is named
   * `<digest>` (`<digest>.config`) only if the bytes hash to `info.digest` and the wrapped
   * putBlob succeeded. A compressed layer is also decompressed into `sha256:<diffID>`, with
   * notes, before this resolves; in `compress` mode an uncompressed layer's compressed variant
   * is made in the background (finished by `close()`). Without a digest, or when the entry is
   * already cached, the blob passes through untouched. An invalid digest throws
   * `DIGEST_INVALID` before anything is read.
   *
   * When the wrapped destination has putBlobFromFile, the blob is written only once: into the
   * cache's temporary file, which is verified and then given to putBlobFromFile (a hard link
   * for dir and oci on the same file system, fsynced there as the destination promises), so
   * the entry and the destination's file may share an inode. Otherwise the stream is teed.
   */
  async putBlob(stream: Readable, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    if (!info.digest) return this.#inner.putBlob(stream, info, opts)
    const digest = parseDigest(info.digest)
    const name = entryName(digest, opts.isConfig)
    if (await this.#isCached(name, info.size)) {
      const result = await this.#inner.putBlob(stream, info, opts)
      this.reference.share(name, { fromInner: true })
      this.#ensureVariant(digest, info, opts)
      return result
    }
    const readBack = this.#inner.putBlobFromFile !== undefined
    const writing = await this.#writerOptions(digest, name, info.size, readBack, opts, digestingStream(stream, digest))
    if (!writing) return this.#inner.putBlob(stream, info, opts)
    if (this.#inner.putBlobFromFile) return this.#putBlobThroughFile(stream, new CacheWriter(writing), { ...info, digest }, opts)
    const tee = new CacheTee(writing)
    pipeline(stream, tee, () => {}) // a source error reaches the wrapped putBlob through the tee
    let result: BlobInfo
    try {
      result = await this.#inner.putBlob(tee, info, opts)
    } catch (err) {
      await tee.settle(false)
      throw err
    }
    this.#afterStore(digest, name, info, opts, await tee.settle(true))
    return result
  }

  /**
   * Asks the wrapped destination first; if it lacks the blob and the cache has it (of the right
   * size), or else the shared tier has it (fetched into the cache, verified), stores the cached
   * file there (with putBlobFromFile when it has one) and resolves what it stored. A failure to
   * do so is counted and resolves undefined, so the copy goes on as usual; an entry the wrapped
   * destination finds corrupt is removed.
   */
  async tryReusingBlob(info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo | undefined> {
    const reused = await this.#inner.tryReusingBlob(info, opts)
    if (reused || !info.digest) return reused
    const digest = parseDigest(info.digest)
    let found
    try {
      found = await findBlob(this.#dir, digest, info.size)
    } catch (err) {
      this.#error(`looking up ${digest}`, err)
      return undefined
    }
    // putBlobFromFile trusts the file to match its digest; an entry damaged since it was named
    // would be stored unverified, so it is checked first: its verification stamp, else its hash
    // (putBlob verifies the stream itself). A blob just fetched from the shared tier was
    // verified as it was written.
    if (found && this.#inner.putBlobFromFile && !(await this.#intact(found.path, digest, found.name, opts))) found = undefined
    if (!found) found = await this.#fetchShared(digest, info.size, opts)
    if (!found) return undefined
    const blob: BlobInfo = { ...info, digest, size: found.size }
    const putOpts: PutBlobOptions = { ...opts, isConfig: opts.isConfig || found.isConfig }
    try {
      const result = this.#inner.putBlobFromFile
        ? await this.#inner.putBlobFromFile(found.path, blob, putOpts)
        : await this.#inner.putBlob(createReadStream(found.path, { highWaterMark: HIGH_WATER_MARK }), blob, putOpts)
      this.#counters.hit()
      await touch(found.path)
      log('reused %s from the cache', digest)
      this.reference.share(found.name, { fromInner: true })
      if (!found.isConfig) this.#ensureVariant(digest, info, putOpts)
      return result
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason
      if (isImageError(err, 'DIGEST_INVALID') || isImageError(err, 'SIZE_INVALID')) await removeQuietly(found.path)
      this.#error(`storing cached ${found.name}`, err)
      return undefined
    }
  }

  /**
   * Stores the manifest as `<sha256 of bytes>` in the cache (best effort) and queues it for the
   * shared tier, then forwards it.
   */
  async putManifest(bytes: Buffer, instanceDigest?: Digest, opts?: CallOptions): Promise<void> {
    const digest = digestOf(bytes)
    try {
      const path = join(this.#dir, digest)
      if (!(await fileExists(path))) await atomicWriteFile(path, bytes)
      this.reference.share(digest, { kind: 'manifest' })
    } catch (err) {
      this.#error(`storing manifest ${digest}`, err)
    }
    await this.#inner.putManifest(bytes, instanceDigest, opts)
  }

  /** Forwards to the wrapped destination. */
  commit(opts?: CallOptions): Promise<void> {
    return this.#inner.commit(opts)
  }

  /** Waits for the background work this destination started, then closes the wrapped one. */
  async close(): Promise<void> {
    while (this.#background.size > 0) await Promise.all(this.#background)
    await this.#inner.close()
  }

  /**
   * putBlob for a wrapped destination with putBlobFromFile: the blob is written once, into the
   * cache's temporary file, which the destination then takes (see putThroughFile).
   */
  async #putBlobThroughFile(stream: Readable, writer: CacheWriter, info: BlobInfo & { digest: Digest }, opts: PutBlobOptions): Promise<BlobInfo> {
    const inner = this.#inner
    const fromFile = inner.putBlobFromFile!
    let result: BlobInfo
    try {
      result = await putThroughFile(stream, writer, info, opts, {
        fromFile: (path) => fromFile.call(inner, path, info, opts),
        fromStream: (bytes) => inner.putBlob(bytes, info, opts),
      })
    } catch (err) {
      await writer.settle(false)
      throw err
    }
    this.#afterStore(info.digest, entryName(info.digest, opts.isConfig), info, opts, await writer.settle(true))
    return result
  }

  async #putBlobFromFile(path: string, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    const inner = this.#inner.putBlobFromFile!.bind(this.#inner)
    if (!info.digest) return inner(path, info, opts)
    const digest = parseDigest(info.digest)
    const name = entryName(digest, opts.isConfig)
    if (await this.#isCached(name, info.size)) {
      const result = await inner(path, info, opts)
      this.reference.share(name, { fromInner: true })
      this.#ensureVariant(digest, info, opts)
      return result
    }
    const writing = await this.#writerOptions(digest, name, info.size, false, opts)
    if (!writing) return inner(path, info, opts)
    const tee = new CacheTee(writing)
    const discard = new Writable({ highWaterMark: HIGH_WATER_MARK, write: (_c, _e, cb) => cb() })
    const feeding = pipelinePromise(createReadStream(path, { highWaterMark: HIGH_WATER_MARK }), tee, discard, { signal: opts.signal }).then(
      () => true,
      () => false,
    )
    let result: BlobInfo
    try {
      result = await inner(path, info, opts)
    } catch (err) {
      tee.destroy()
      await feeding
      await tee.settle(false)
      throw err
    }
    this.#afterStore(digest, name, info, opts, await tee.settle(await feeding))
    return result
  }

  async #putBlobFromLocalFile(path: string, info: BlobInfo, opts: PutBlobOptions = {}): Promise<BlobInfo> {
    // the stream's way: through putBlob (the cache), or to the wrapped destination alone; the
    // file is closed whatever the reader did with it
    const streamed = async (to: ImageDestination = this) => {
      const stream = await openLocalBlob(path, info, opts)
      try {
        return await to.putBlob(stream, info, opts)
      } finally {
        stream.destroy()
      }
    }
    if (!info.digest) return streamed()
    const digest = parseDigest(info.digest)
    const name = entryName(digest, opts.isConfig)
    if (await this.#isCached(name, info.size)) return streamed()
    const copied = await copyLocalFile(path, { ...info, digest }, name, opts, {
      dir: this.#dir,
      direct: () => this.#mayWriteDirect(true),
      fromFile: (tmp) => this.#inner.putBlobFromFile!(tmp, { ...info, digest }, opts),
      onError: (what, err) => this.#error(what, err),
    })
    if (copied === undefined) return streamed()
    if (copied === null) return streamed(this.#inner)
    const outcome: TeeOutcome = { verified: true, stored: false, algorithm: copied.algorithm }
    const final = join(this.#dir, name)
    try {
      if (!(await fileExists(final))) {
        await rename(copied.tmp, final)
        await stampVerified(final, copied.bytes)
        log('stored %s', name)
      }
    } catch (err) {
      this.#error(`storing ${name}`, err)
    } finally {
      await removeQuietly(copied.tmp)
    }
    outcome.stored = await fileExists(final)
    if (copied.decompressed) {
      const onError = (what: string, err: unknown) => this.#error(what, err)
      outcome.decompressed = await storeDecompressed(this.#dir, digest, copied.decompressed.algorithm, copied.decompressed, onError)
    }
    this.#afterStore(digest, name, info, opts, outcome)
    return copied.stored
  }

  /** True when the entry is cached already (with the expected size; a wrong-size one is removed). */
  async #isCached(name: string, size: number): Promise<boolean> {
    const path = join(this.#dir, name)
    try {
      const st = await lstat(path)
      if (!st.isFile()) return false
      if (size < 0 || st.size === size) {
        await touch(path)
        log('%s already cached', name)
        return true
      }
      await removeQuietly(path)
    } catch (err) {
      const code = errnoCode(err)
      if (code !== 'ENOENT' && code !== 'ENOTDIR') this.#error(`checking ${name}`, err)
    }
    return false
  }

  /**
   * The options of a CacheWriter on a new temporary file for `name` (opened for reading too, see
   * putThroughFile), or undefined when none can be created (counted). A large blob's file is
   * written with direct I/O (see direct-write.ts) unless something reads it again soon: the
   * wrapped destination, when it takes the file (`readBack`) other than by a hard link, or the
   * compressed variant `compress` mode makes.
   */
  async #writerOptions(
    digest: Digest,
    name: string,
    size: number,
    readBack: boolean,
    opts: PutBlobOptions,
    upstream?: DigestingStream,
  ): Promise<CacheTeeOptions | undefined> {
    const path = tempPath(this.#dir, name)
    try {
      const handle = await open(path, 'wx+', FILE_MODE)
      const large = size < 0 || size >= DIRECT_MIN_BYTES
      const direct = large && (await this.#mayWriteDirect(readBack)) ? await DirectWriter.open(handle) : undefined
      const onError = (what: string, err: unknown) => this.#error(what, err)
      return { dir: this.#dir, digest, name, file: { handle, path, direct }, decompress: !opts.isConfig, onError, upstream }
    } catch (err) {
      this.#error(`creating a temporary file for ${name}`, err)
      return undefined
    }
  }

  /** See #writerOptions: whether a cache file may skip the page cache. */
  async #mayWriteDirect(readBack: boolean): Promise<boolean> {
    if (this.reference.compress === 'compress') return false
    if (!readBack) return true
    this.#linksCacheFiles ??= sameDevice(this.#dir, this.#inner.linkDirectory)
    return this.#linksCacheFiles
  }

  /**
   * Queues a newly cached entry and its decompressed form (with their notes, written by now)
   * for the shared tier; in `compress` mode, starts making the compressed variant of a newly
   * cached uncompressed layer.
   */
  #afterStore(digest: Digest, name: string, info: BlobInfo, opts: PutBlobOptions, outcome: TeeOutcome): void {
    if (outcome.stored) this.reference.share(name, { fromInner: true })
    if (outcome.decompressed) this.reference.share(outcome.decompressed)
    if (outcome.stored && outcome.algorithm === null) this.#ensureVariant(digest, info, opts)
  }

  /** The blob fetched from the shared tier into the cache (verified), or undefined (see fetchFromTier). */
  #fetchShared(digest: Digest, size: number, opts: CallOptions): Promise<TierFetched | undefined> {
    const tier = this.reference.shared
    if (!tier) return Promise.resolve(undefined)
    return fetchFromTier(tier, this.#dir, { digest, size }, opts, (what, err) => this.#error(what, err))
  }


  /**
   * In `compress` mode, makes sure the cached layer `digest` has a variant in the cache's
   * algorithm, unless it is a config or declared compressed; the entry itself is checked too
   * (see makeCompressedVariant), so a compressed blob gets no variant.
   */
  #ensureVariant(digest: Digest, info: BlobInfo, opts: PutBlobOptions): void {
    const { compress, compressAlgorithm } = this.reference
    if (compress !== 'compress' || opts.isConfig) return
    if (info.mediaType !== undefined && layerCompressionOf(info.mediaType) !== null) return
    const task = this.reference.runInBackground(async () => {
      const variant = await makeCompressedVariant(this.#dir, digest, compressAlgorithm, (what, err) => this.#error(what, err))
      if (variant) {
        // the variant with its `.decompressed` note, and the layer again: its `.compressed` note grew
        this.reference.share(variant)
        this.reference.share(digest)
      }
      return variant
    })
    this.#background.add(task)
    task.finally(() => this.#background.delete(task)).catch(() => {})
  }

  /**
   * Whether a cached file may be stored unread: stamped as verified and not written to since,
   * or hashing to `digest` (see stamp.ts); a corrupt one is removed and counted.
   */
  async #intact(path: string, digest: Digest, name: string, opts: CallOptions): Promise<boolean> {
    try {
      if (await entryIntact(path, digest, opts)) return true
      await removeQuietly(path)
      this.#error(`cached ${name} is corrupt; removed`, new Error('digest mismatch'))
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason
      this.#error(`hashing ${name}`, err)
    }
    return false
  }

  #error(what: string, err: unknown): void {
    this.#counters.error()
    log('cache error: %s: %s', what, (err as Error)?.message ?? err)
  }
}

/** True when `a` and `b` (when given) are on one device; false when either cannot be looked at. */
async function sameDevice(a: string, b: string | undefined): Promise<boolean> {
  if (b === undefined) return false
  try {
    const [x, y] = await Promise.all([stat(a), stat(b)])
    return x.dev === y.dev
  } catch {
    return false
  }
}
