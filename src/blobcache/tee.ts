// The tee of the cache's destination side: a pass-through Transform between the caller's stream
// and the wrapped destination's putBlob that also writes every chunk to a `.tmp-` file, hashes
// it, and (for a compressed layer) feeds a background decompression. Only once the wrapped
// destination has succeeded and the hash equals the expected digest is the file named.
import { createHash, type Hash } from 'node:crypto'
import type { FileHandle } from 'node:fs/promises'
import { rename } from 'node:fs/promises'
import { join } from 'node:path'
import { Transform, type TransformCallback } from 'node:stream'
import debug from 'debug'
import { detectCompression, PEEK_BYTES } from '../compression.js'
import { type Digest, type DigestAlgorithm, type DigestingStream, digestAlgorithm, streamDigest } from '../digest.js'
import type { DetectedAlgorithm } from '../types.js'
import { HIGH_WATER_MARK, fileExists, removeQuietly } from './files.js'
import { stampVerified } from './stamp.js'
import { type CacheErrorHandler, Decompression, storeDecompressed } from './variants.js'

const log = debug('blobcache:blobcache:tee')

/** Options of {@link CacheTee}. */
export interface CacheTeeOptions {
  /** The cache directory. */
  dir: string
  /** The digest the bytes MUST hash to for the entry to be kept. */
  digest: Digest
  /** The final file name (`<digest>` or `<digest>.config`). */
  name: string
  /** The open temporary file and its path; without them only the derived entry is made. */
  file?: { handle: FileHandle; path: string }
  /** Decompress a compressed blob into its `sha256:<diffID>` entry. */
  decompress: boolean
  /** Receives cache failures; none of them fails the stream. */
  onError: CacheErrorHandler
  /**
   * The stream feeding the tee, when it hashes what it passes with the digest's algorithm: its
   * digest is taken instead of hashing the same bytes here again.
   */
  upstream?: DigestingStream
}

/** What {@link CacheTee.settle} did. */
export interface TeeOutcome {
  /** The bytes hashed to the expected digest and the consumer succeeded. */
  verified: boolean
  /** The entry `<name>` exists now (written here, or already there). */
  stored: boolean
  /** The compression detected from the first bytes (null: uncompressed or unknown). */
  algorithm: DetectedAlgorithm | null
  /** The decompressed entry's digest, when one was stored. */
  decompressed?: Digest
}

/**
 * Passes every chunk through unchanged and copies it to the cache. A cache write that fails
 * stops the copying (the temp file is dropped and the failure reported) but never the stream.
 * Each chunk is pushed on before its cache write finishes; the next one waits for that write, so
 * the cache adds at most one chunk of latency and memory stays constant.
 */
export class CacheTee extends Transform implements DigestingStream {
  readonly #opts: CacheTeeOptions
  readonly #hash: Hash | undefined
  #bytes = 0
  #file: { handle: FileHandle; path: string } | undefined
  #head: Buffer[] | null = []
  #headBytes = 0
  #algorithm: DetectedAlgorithm | null = null
  #decompression: Decompression | undefined
  #computed: Digest | undefined
  #pending: Promise<unknown> = Promise.resolve()

  constructor(opts: CacheTeeOptions) {
    super({ highWaterMark: HIGH_WATER_MARK })
    this.#opts = opts
    this.#file = opts.file
    this.#hash = opts.upstream ? undefined : createHash(digestAlgorithm(opts.digest))
  }

  /** The algorithm of the expected digest, which the tee verifies. */
  get digestAlgorithm(): DigestAlgorithm {
    return digestAlgorithm(this.#opts.digest)
  }

  /** The digest of what passed, so that the wrapped destination need not hash it again. */
  [streamDigest](): { digest: Digest; bytes: number } {
    if (this.#computed === undefined) throw new Error('CacheTee: digest read before the stream ended')
    return { digest: this.#computed, bytes: this.#bytes }
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.#hash?.update(chunk)
    this.#bytes += chunk.length
    this.push(chunk)
    const work: Promise<unknown>[] = []
    if (this.#file) work.push(this.#writeFile(this.#file, chunk))
    if (this.#head) {
      this.#head.push(chunk)
      this.#headBytes += chunk.length
      if (this.#headBytes >= PEEK_BYTES) work.push(this.#startDerived())
    } else if (this.#decompression) work.push(this.#decompression.write(chunk))
    if (work.length === 0) {
      cb()
      return
    }
    this.#pending = Promise.all(work)
    this.#pending.then(() => cb(), cb)
  }

  override _flush(cb: TransformCallback): void {
    const finish = () => {
      // The upstream has ended before this flush, so its digest is final here.
      this.#computed = this.#opts.upstream
        ? this.#opts.upstream[streamDigest]().digest
        : (`${digestAlgorithm(this.#opts.digest)}:${this.#hash!.digest('hex')}` as Digest)
      this.#decompression?.end()
      cb()
    }
    if (this.#head) this.#startDerived().then(finish, cb)
    else finish()
  }

  /**
   * Commits or discards, once the consumer is done with the stream: the entry is named only if
   * `consumerSucceeded`, the stream was read to its end, nothing failed and the bytes hash to
   * the expected digest. Waits for the decompression and stores its entry and notes under the
   * same condition. Never rejects.
   */
  async settle(consumerSucceeded: boolean): Promise<TeeOutcome> {
    const { dir, digest, name } = this.#opts
    if (this.#computed === undefined) {
      this.#decompression?.abort()
      if (!this.destroyed) this.destroy()
    }
    await this.#pending.catch(() => {})
    const file = this.#file
    this.#file = undefined
    if (file) await file.handle.close().catch(() => {})
    const verified = consumerSucceeded && this.#computed === digest
    if (!verified && this.#computed !== undefined && consumerSucceeded) {
      log('not caching %s: the bytes hash to %s', digest, this.#computed)
    }
    const outcome: TeeOutcome = { verified, stored: false, algorithm: this.#algorithm }
    const final = join(dir, name)
    if (file) {
      try {
        if (verified && !(await fileExists(final))) {
          await rename(file.path, final)
          await stampVerified(final, this.#bytes)
          log('stored %s', name)
        }
      } catch (err) {
        this.#opts.onError(`storing ${name}`, err)
      } finally {
        await removeQuietly(file.path)
      }
    }
    outcome.stored = verified && (await fileExists(final))
    const decompression = this.#decompression
    if (decompression) {
      const derived = await decompression.done
      if (derived && verified) {
        outcome.decompressed = await storeDecompressed(dir, digest, decompression.algorithm, derived, this.#opts.onError)
      } else if (derived) await removeQuietly(derived.tmp)
    }
    return outcome
  }

  async #writeFile(file: { handle: FileHandle; path: string }, chunk: Buffer): Promise<void> {
    try {
      let offset = 0
      while (offset < chunk.length) {
        const { bytesWritten } = await file.handle.write(chunk, offset, chunk.length - offset)
        offset += bytesWritten
      }
    } catch (err) {
      if (this.#file !== file) return
      this.#file = undefined
      await file.handle.close().catch(() => {})
      await removeQuietly(file.path)
      this.#opts.onError(`writing ${this.#opts.name}`, err)
    }
  }

  /** Decides from the first bytes whether to decompress, and feeds them if so. */
  async #startDerived(): Promise<void> {
    const head = Buffer.concat(this.#head ?? [])
    this.#head = null
    this.#algorithm = detectCompression(head)
    if (!this.#algorithm || !this.#opts.decompress) return
    const base = this.#opts.digest
    this.#decompression = new Decompression(this.#opts.dir, base, this.#algorithm, this.#opts.onError)
    await this.#decompression.write(head)
  }
}
