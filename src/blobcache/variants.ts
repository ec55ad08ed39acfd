// Derived entries: the decompressed form of a compressed layer (made while the layer streams
// through the cache), and the compressed variant of an uncompressed layer (made in the
// background from its cache entry, in `compress` mode). Each is written to a `.tmp-` file,
// hashed as it is written, named by that hash, and linked to its origin by the notes.
import { createReadStream } from 'node:fs'
import { rename } from 'node:fs/promises'
import { once } from 'node:events'
import { join } from 'node:path'
import type { Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import { compressStream, decompressStream, detectFileCompression } from '../compression.js'
import { type Digest, verifyDigest } from '../digest.js'
import { errnoCode } from '../errors.js'
import { openNewFile } from '../io/new-file.js'
import type { CompressionAlgorithm, DetectedAlgorithm } from '../types.js'
import { FILE_MODE, HIGH_WATER_MARK, fileExists, removeQuietly, tempPath } from './files.js'
import { threadDecompression } from './decompress-thread.js'
import { addCompressedVariant, readCompressedNote, writeDecompressedNote } from './notes.js'
import { stampVerified } from './stamp.js'

const log = debug('blobcache:blobcache:variants')

/** Bytes that may wait for the decompressor before the tee waits for it. */
const DECOMPRESS_SLACK = 4 << 20

/** Reports a cache failure (logged and counted by the caller). */
export type CacheErrorHandler = (what: string, err: unknown) => void

/** A finished derived file, not yet named. */
export interface DerivedFile {
  tmp: string
  digest: Digest
}

/**
 * A decompression of a blob given chunk by chunk into a temporary file, hashed (sha256) as it
 * is written. A failure (corrupt data, a missing bzip2/xz program, a full disk) stops it
 * quietly: it is reported to the error handler, the temporary file is removed, writes then do
 * nothing, and {@link done} resolves undefined. It never fails the copy.
 */
export interface Decompression {
  /** The algorithm it decompresses. */
  readonly algorithm: DetectedAlgorithm
  /** The finished file, or undefined after a failure or an abort (then no file is left). */
  readonly done: Promise<DerivedFile | undefined>
  /**
   * Feeds bytes, which MUST NOT change afterwards (they may still be read once this has
   * resolved); resolves when it can take more (or has failed). It MUST bound the bytes it holds
   * (back-pressure), and never rejects.
   */
  write(chunk: Buffer): Promise<void>
  /** Ends the input; {@link done} settles when everything is decompressed. */
  end(): void
  /** Stops it; {@link done} then resolves undefined (not reported as a failure), with no file left. */
  abort(): void
}

/**
 * Starts decompressing `algorithm` into a temporary file of `dir` named after `base`: gzip and
 * zstd on a decompression thread (see decompress-thread.ts), bzip2 and xz here.
 */
export function startDecompression(dir: string, base: string, algorithm: DetectedAlgorithm, onError: CacheErrorHandler): Decompression {
  const threaded = algorithm === 'gzip' || algorithm === 'zstd' ? threadDecompression(dir, base, onError, algorithm) : undefined
  return threaded ?? new StreamDecompression(dir, base, algorithm, onError)
}

/**
 * A {@link Decompression} on this thread, with Node streams. Writing waits while the
 * decompressor is busy, which is what bounds its memory.
 */
class StreamDecompression implements Decompression {
  readonly #input: Transform | undefined
  readonly done: Promise<DerivedFile | undefined>
  #failed = false
  #aborted = false

  constructor(
    dir: string,
    base: string,
    readonly algorithm: DetectedAlgorithm,
    onError: CacheErrorHandler,
  ) {
    const tmp = tempPath(dir, base)
    let input: Transform
    try {
      input = decompressStream(algorithm)
    } catch (err) {
      log('cannot decompress %s: %s', algorithm, (err as Error).message)
      this.#failed = true
      this.done = Promise.resolve(undefined)
      return
    }
    this.#input = input
    const hasher = verifyDigest({ algorithm: 'sha256' })
    // the input takes bytes (up to the slack) while the file is being created
    this.done = openNewFile(tmp, { mode: FILE_MODE, highWaterMark: HIGH_WATER_MARK })
      .then((out) => pipeline(input, hasher, out))
      .then(
        () => ({ tmp, digest: hasher.digest }),
        async (err: unknown) => {
          this.#failed = true
          input.destroy()
          await removeQuietly(tmp)
          if (!this.#aborted) onError(`decompressing ${base} (${algorithm})`, err)
          return undefined
        },
      )
  }

  /**
   * Feeds bytes; resolves when the decompressor can take more (or has failed). Up to
   * {@link DECOMPRESS_SLACK} bytes may wait for it, so that it runs alongside the stream
   * instead of in step with every chunk.
   */
  async write(chunk: Buffer): Promise<void> {
    const input = this.#input
    if (!input || this.#failed || input.destroyed || input.writableEnded) return
    input.write(chunk)
    if (input.writableLength <= DECOMPRESS_SLACK) return
    await Promise.race([once(input, 'drain').catch(() => {}), this.done])
  }

  /** Ends the input; {@link done} settles when everything is decompressed. */
  end(): void {
    if (this.#input && !this.#failed && !this.#input.writableEnded) this.#input.end()
  }

  /** Stops it; {@link done} then resolves undefined and the temporary file is gone. */
  abort(): void {
    this.#aborted = true
    this.#failed = true
    this.#input?.destroy()
  }
}

/**
 * Names a finished decompressed file `sha256:<U>` (unless that entry exists) and writes the
 * notes: C is recorded in `<U>.compressed` and U in `<C>.decompressed`. Never rejects; failures
 * go to `onError`. Resolves U, or undefined when nothing was recorded.
 */
export async function storeDecompressed(
  dir: string,
  compressed: Digest,
  algorithm: DetectedAlgorithm,
  file: DerivedFile,
  onError: CacheErrorHandler,
): Promise<Digest | undefined> {
  try {
    await placeFile(dir, file)
    await addCompressedVariant(dir, file.digest, compressed, algorithm)
    await writeDecompressedNote(dir, compressed, file.digest)
    log('stored %s, decompressed from %s (%s)', file.digest, compressed, algorithm)
    return file.digest
  } catch (err) {
    await removeQuietly(file.tmp)
    onError(`storing the decompressed form of ${compressed}`, err)
    return undefined
  }
}

/**
 * Makes the `algorithm` variant of the cached uncompressed blob `uncompressed` from its entry,
 * stores it under its digest and records it in the notes. Skipped when the note already names
 * an existing variant of that algorithm, and when the entry is missing or itself compressed.
 * Never rejects; resolves the variant's digest.
 */
export async function makeCompressedVariant(
  dir: string,
  uncompressed: Digest,
  algorithm: CompressionAlgorithm,
  onError: CacheErrorHandler,
): Promise<Digest | undefined> {
  const tmp = tempPath(dir, `${uncompressed}.${algorithm}`)
  try {
    for (const [d, alg] of await readCompressedNote(dir, uncompressed)) {
      if (alg === algorithm && (await fileExists(join(dir, d)))) return d
    }
    if (!(await isUncompressedFile(join(dir, uncompressed)))) return undefined
    const hasher = verifyDigest({ algorithm: 'sha256' })
    const out = await openNewFile(tmp, { mode: FILE_MODE, highWaterMark: HIGH_WATER_MARK })
    await pipeline(createReadStream(join(dir, uncompressed), { highWaterMark: HIGH_WATER_MARK }), compressStream(algorithm), hasher, out)
    const file = { tmp, digest: hasher.digest }
    await placeFile(dir, file)
    await addCompressedVariant(dir, uncompressed, file.digest, algorithm)
    await writeDecompressedNote(dir, file.digest, uncompressed)
    log('made %s variant %s of %s', algorithm, file.digest, uncompressed)
    return file.digest
  } catch (err) {
    onError(`making the ${algorithm} variant of ${uncompressed}`, err)
    return undefined
  } finally {
    await removeQuietly(tmp)
  }
}

/** Renames a verified temp file to its digest, unless that entry is already there. */
async function placeFile(dir: string, file: DerivedFile): Promise<void> {
  const path = join(dir, file.digest)
  if (await fileExists(path)) {
    await removeQuietly(file.tmp)
    return
  }
  await rename(file.tmp, path)
  await stampVerified(path)
}

/** True when the file exists and its first bytes show no known compression. */
async function isUncompressedFile(path: string): Promise<boolean> {
  try {
    return (await detectFileCompression(path)) === null
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return false
    throw err
  }
}
