// What the cache's destination side does with the bytes of a blob on their way to the wrapped
// destination: a CacheWriter writes every chunk to a `.tmp-` file, hashes it, and (for a
// compressed layer) feeds a background decompression; only once the wrapped destination has
// succeeded and the hash equals the expected digest is the file named. The CacheTee is the
// writer as a pass-through Transform, for destinations that read a stream.
import { createHash, type Hash } from 'node:crypto'
import type { FileHandle } from 'node:fs/promises'
import { rename } from 'node:fs/promises'
import { join } from 'node:path'
import { Transform, type TransformCallback } from 'node:stream'
import debug from 'debug'
import { detectCompression, PEEK_BYTES } from '../compression.js'
import { type Digest, type DigestAlgorithm, type DigestingStream, digestAlgorithm, streamDigest } from '../digest.js'
import type { DetectedAlgorithm } from '../types.js'
import type { DirectWriter } from '../io/direct-write.js'
import { HIGH_WATER_MARK, fileExists, removeQuietly } from './files.js'
import { stampVerified } from './stamp.js'
import { type CacheErrorHandler, type Decompression, startDecompression, storeDecompressed } from './variants.js'

const log = debug('blobcache:blobcache:tee')

/** Options of {@link CacheWriter} and {@link CacheTee}. */
export interface CacheTeeOptions {
  /** The cache directory. */
  dir: string
  /** The digest the bytes MUST hash to for the entry to be kept. */
  digest: Digest
  /** The final file name (`<digest>` or `<digest>.config`). */
  name: string
  /**
   * The open temporary file (created by the caller, `.tmp-` in `dir`) and its path, with the
   * writer to use for it when its bytes go to the disk directly (then it holds the staged bytes
   * and closes with the writer).
   */
  file: { handle: FileHandle; path: string; direct?: DirectWriter }
  /** Decompress a compressed blob into its `sha256:<diffID>` entry. */
  decompress: boolean
  /** Receives cache failures; none of them fails the stream. */
  onError: CacheErrorHandler
  /**
   * The stream feeding the writer, when it hashes what it passes with the digest's algorithm:
   * its digest is taken instead of hashing the same bytes here again.
   */
  upstream?: DigestingStream
}

/** What {@link CacheWriter.settle} did. */
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

/** The temporary file of a {@link CacheWriter}, as far as it was written. */
export interface WrittenFile {
  handle: FileHandle
  path: string
  direct?: DirectWriter
  /**
   * Bytes given to it, the first ones of the blob (with a direct writer, the last of them may be
   * staged until the writer's end); after a failure, those in it.
   */
  bytes: number
  /**
   * A write to it failed: it holds only the first `bytes` of the blob, and `pending` the ones
   * given after them and before the chunk whose write failed.
   */
  failed: boolean
  pending?: Buffer[]
}

/**
 * Writes a blob's chunks, given in order, to the cache's temporary file, hashes them and feeds
 * the decompression of a compressed layer. A cache write that fails stops the copying (the
 * failure is reported once, the file is dropped at {@link settle}) but never the caller.
 */
export class CacheWriter {
  readonly #opts: CacheTeeOptions
  readonly #hash: Hash | undefined
  #bytes = 0
  #file: WrittenFile | undefined
  #head: Buffer[] | null = []
  #headBytes = 0
  #algorithm: DetectedAlgorithm | null = null
  #decompression: Decompression | undefined
  #computed: Digest | undefined
  #pending: Promise<unknown> = Promise.resolve()

  constructor(opts: CacheTeeOptions) {
    this.#opts = opts
    this.#file = { ...opts.file, bytes: 0, failed: false }
    this.#hash = opts.upstream ? undefined : createHash(digestAlgorithm(opts.digest))
  }

  /** The bytes given so far. */
  get bytes(): number {
    return this.#bytes
  }

  /** The digest of every byte given, once {@link end} has resolved. */
  get digest(): Digest | undefined {
    return this.#computed
  }

  /** The temporary file, until {@link settle}. */
  get file(): Readonly<WrittenFile> | undefined {
    return this.#file
  }

  /**
   * Takes the next chunk, which MUST NOT change afterwards (as any stream chunk); resolves once
   * it is written, so that the caller holds at most one chunk. Never rejects.
   */
  write(chunk: Buffer): Promise<void> {
    this.#hash?.update(chunk)
    this.#bytes += chunk.length
    const work: Promise<unknown>[] = []
    const file = this.#file
    if (file && !file.failed) work.push(this.#writeFile(file, chunk))
    if (this.#head) {
      this.#head.push(chunk)
      this.#headBytes += chunk.length
      if (this.#headBytes >= PEEK_BYTES) work.push(this.#startDerived())
    } else if (this.#decompression) work.push(this.#decompression.write(chunk))
    const done = work.length === 0 ? Promise.resolve() : work.length === 1 ? work[0] : Promise.all(work)
    this.#pending = done
    return done.then(
      () => {},
      () => {},
    )
  }

  /**
   * Marks the end of the blob: takes the digest (the upstream's, which has ended by now, or its
   * own) and ends the decompression's input.
   */
  async end(): Promise<void> {
    await this.#pending.catch(() => {})
    const file = this.#file
    if (file?.direct && !file.failed) {
      try {
        await file.direct.end()
      } catch (err) {
        this.#directFailed(file, file.direct, file.bytes, err)
      }
    }
    if (this.#head) await this.#startDerived()
    this.#computed = this.#opts.upstream
      ? this.#opts.upstream[streamDigest]().digest
      : (`${digestAlgorithm(this.#opts.digest)}:${this.#hash!.digest('hex')}` as Digest)
    this.#decompression?.end()
  }

  /**
   * Commits or discards, once the consumer is done with the blob: the entry is named only if
   * `consumerSucceeded`, the blob was given to its end, nothing failed and the bytes hash to
   * the expected digest. Waits for the decompression and stores its entry and notes under the
   * same condition. Never rejects.
   */
  async settle(consumerSucceeded: boolean): Promise<TeeOutcome> {
    const { dir, digest, name } = this.#opts
    if (this.#computed === undefined) this.#decompression?.abort()
    await this.#pending.catch(() => {})
    const file = this.#file
    this.#file = undefined
    if (file) {
      await file.direct?.close()
      await file.handle.close().catch(() => {})
    }
    const verified = consumerSucceeded && this.#computed === digest
    if (!verified && this.#computed !== undefined && consumerSucceeded) {
      log('not caching %s: the bytes hash to %s', digest, this.#computed)
    }
    const outcome: TeeOutcome = { verified, stored: false, algorithm: this.#algorithm }
    const final = join(dir, name)
    if (file) {
      try {
        if (verified && !file.failed && !(await fileExists(final))) {
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

  async #writeFile(file: WrittenFile, chunk: Buffer): Promise<void> {
    if (file.direct) return this.#writeDirect(file, file.direct, chunk)
    try {
      let offset = 0
      while (offset < chunk.length) {
        const { bytesWritten } = await file.handle.write(chunk, offset, chunk.length - offset)
        offset += bytesWritten
      }
      file.bytes += chunk.length
    } catch (err) {
      if (this.#file !== file || file.failed) return
      file.failed = true
      this.#opts.onError(`writing ${this.#opts.name}`, err)
    }
  }

  async #writeDirect(file: WrittenFile, direct: DirectWriter, chunk: Buffer): Promise<void> {
    const before = file.bytes
    try {
      await direct.write(chunk)
      file.bytes += chunk.length
    } catch (err) {
      this.#directFailed(file, direct, before, err)
    }
  }

  /**
   * Marks the file failed after a direct write did, for a replay of the first `given` bytes:
   * those in the file (it may hold more: the start of the chunk being written), and in
   * `pending` those that are not.
   */
  #directFailed(file: WrittenFile, direct: DirectWriter, given: number, err: unknown): void {
    if (this.#file !== file || file.failed) return
    let missing = given - direct.written
    const pending: Buffer[] = []
    for (const part of direct.unwritten()) {
      if (missing <= 0) break
      const take = part.subarray(0, Math.min(part.length, missing))
      pending.push(Buffer.from(take)) // a copy: no view of a stage is kept
      missing -= take.length
    }
    file.bytes = Math.min(direct.written, given)
    file.pending = pending
    file.failed = true
    this.#opts.onError(`writing ${this.#opts.name}`, err)
  }

  /** Decides from the first bytes whether to decompress, and feeds them if so. */
  async #startDerived(): Promise<void> {
    const parts = this.#head ?? []
    const head = parts.length === 1 ? parts[0] : Buffer.concat(parts)
    this.#head = null
    this.#algorithm = detectCompression(head)
    if (!this.#algorithm || !this.#opts.decompress) return
    this.#decompression = startDecompression(this.#opts.dir, this.#opts.digest, this.#algorithm, this.#opts.onError)
    await this.#decompression.write(head)
  }
}

/**
 * Passes every chunk through unchanged and copies it to the cache through a {@link CacheWriter}.
 * Each chunk is pushed on before its cache write finishes; the next one waits for that write,
 * so the cache adds at most one chunk of latency and memory stays constant.
 */
export class CacheTee extends Transform implements DigestingStream {
  readonly #writer: CacheWriter
  readonly #digest: Digest
  #ended = false

  constructor(opts: CacheTeeOptions) {
    super({ highWaterMark: HIGH_WATER_MARK })
    this.#writer = new CacheWriter(opts)
    this.#digest = opts.digest
  }

  /** The algorithm of the expected digest, which the tee verifies. */
  get digestAlgorithm(): DigestAlgorithm {
    return digestAlgorithm(this.#digest)
  }

  /** The digest of what passed, so that the wrapped destination need not hash it again. */
  [streamDigest](): { digest: Digest; bytes: number } {
    const digest = this.#writer.digest
    if (digest === undefined) throw new Error('CacheTee: digest read before the stream ended')
    return { digest, bytes: this.#writer.bytes }
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.push(chunk)
    this.#writer.write(chunk).then(() => cb())
  }

  override _flush(cb: TransformCallback): void {
    this.#writer.end().then(() => {
      this.#ended = true
      cb()
    }, cb)
  }

  /** See {@link CacheWriter.settle}; a tee not read to its end is destroyed first. */
  async settle(consumerSucceeded: boolean): Promise<TeeOutcome> {
    if (!this.#ended && !this.destroyed) this.destroy()
    return this.#writer.settle(consumerSucceeded)
  }
}
