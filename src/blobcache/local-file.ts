// A blob copied from a source's own local file (an `oci:` or `dir:` layout's blob) into a cache
// whose wrapped destination takes local files: a decompression thread reads the file into the
// memory it writes the cache's `.tmp-` file from, hashes it there and, for a gzip or zstd layer,
// decompresses the same bytes into the decompressed file, so no byte of the blob passes through
// the main thread (see decompress-thread.ts). Only once the bytes hash to the digest is the file
// given to the destination (a hard link for dir and oci on the same file system), and only once
// the destination has it is the entry named. Blobs the thread is not worth starting for (small
// ones), or that it cannot decompress (bzip2, xz), go the stream's way.
import { open } from 'node:fs/promises'
import { type Readable, Transform, pipeline } from 'node:stream'
import debug from 'debug'
import { detectFileCompression } from '../compression.js'
import { type Digest, checkDigest, digestAlgorithm } from '../digest.js'
import { ImageError, errnoCode } from '../errors.js'
import type { BlobInfo, DetectedAlgorithm, PutBlobOptions } from '../types.js'
import { type FileCopyResult, FileCopyError, copyFileOnThread } from './decompress-thread.js'
import { HIGH_WATER_MARK, fileExists, removeQuietly, tempPath } from './files.js'

const log = debug('blobcache:blobcache:local-file')

/** Blobs from this size on are copied by a thread even when there is nothing to decompress. */
export const THREAD_COPY_MIN_BYTES = 1 << 20

/** What {@link copyLocalFile} needs from the cache's destination. */
export interface LocalFileTarget {
  /** The cache directory. */
  dir: string
  /** Whether the cache's copy may skip the page cache (nothing reads it again soon). */
  direct(): Promise<boolean>
  /** The wrapped destination's putBlobFromFile, for the verified copy. */
  fromFile(path: string): Promise<BlobInfo>
  /** Reports a cache failure (counted; never fails the copy). */
  onError(what: string, err: unknown): void
}

/** A blob copied by {@link copyLocalFile}: stored in the destination, its cache files not yet named. */
export interface LocalFileCopy {
  /** What the wrapped destination resolved. */
  stored: BlobInfo
  /** The verified copy, now also the destination's (to be named `<digest>`, else removed). */
  tmp: string
  bytes: number
  algorithm: DetectedAlgorithm | null
  /** The decompressed file, its digest and what it was decompressed from, when one was made. */
  decompressed?: { tmp: string; digest: Digest; algorithm: 'gzip' | 'zstd' }
}

/**
 * Copies the blob at `path` (not verified) into a new temporary file of the cache on a thread,
 * with the decompressed file of a gzip or zstd layer, verifies it against `info.digest` and size and
 * gives it to the destination. Resolves undefined, having done nothing, when the blob should be
 * streamed through the cache instead (a small one, a bzip2 or xz one, no thread), and null
 * when the cache failed (reported): then the blob goes to the destination alone. Rejects like
 * putBlob: `DIGEST_INVALID`, `SIZE_INVALID`, `BLOB_UNKNOWN` for a missing file, the
 * destination's error, or the abort's reason, with no file left.
 */
export async function copyLocalFile(
  path: string,
  info: BlobInfo & { digest: Digest },
  name: string,
  opts: PutBlobOptions,
  target: LocalFileTarget,
): Promise<LocalFileCopy | null | undefined> {
  const { digest } = info
  const algorithm = await detectFileCompression(path).catch(() => undefined)
  if (algorithm === undefined) return undefined // the stream's way reports it
  const decompress = (algorithm === 'gzip' || algorithm === 'zstd') && !opts.isConfig ? algorithm : undefined
  if (!decompress && (algorithm !== null || opts.isConfig || (info.size >= 0 && info.size < THREAD_COPY_MIN_BYTES))) return undefined
  const tmp = tempPath(target.dir, name)
  const out = decompress ? tempPath(target.dir, digest) : undefined
  const direct = (info.size < 0 || info.size >= THREAD_COPY_MIN_BYTES) && (await target.direct())
  const spec = { source: path, size: info.size, copy: tmp, algorithm: digestAlgorithm(digest), direct, out, decompress }
  const copying = copyFileOnThread(spec, { signal: opts.signal, onProgress: opts.onProgress })
  if (!copying) return undefined
  let copied: FileCopyResult
  try {
    copied = await copying
  } catch (err) {
    if (opts.signal?.aborted) throw opts.signal.reason
    if (!(err instanceof FileCopyError)) throw err
    if (err.side === 'cache') {
      target.onError(`writing ${name}`, err)
      return null
    }
    if (err.code === 'SIZE_INVALID') throw new ImageError('SIZE_INVALID', `blob ${digest}: ${err.message}`)
    if (err.code === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `blob ${digest}: ${path}: ${err.message}`)
    throw Object.assign(new Error(`reading blob ${digest} from ${path}: ${err.message}`), err.code ? { code: err.code } : {})
  }
  const decompressed =
    out && decompress && copied.out && 'hex' in copied.out ? { tmp: out, digest: `sha256:${copied.out.hex}` as Digest, algorithm: decompress } : undefined
  if (copied.out && 'error' in copied.out) target.onError(`decompressing ${digest} (${decompress})`, copied.out.error)
  const dropAll = () => Promise.all([removeQuietly(tmp), decompressed && removeQuietly(decompressed.tmp)])
  try {
    checkDigest({ digest: `${digestAlgorithm(digest)}:${copied.hex}` as Digest, bytes: copied.bytes }, { expected: digest, size: info.size })
  } catch (err) {
    await dropAll()
    throw err
  }
  log('%s copied from %s (%d bytes)%s', digest, path, copied.bytes, decompressed ? `, decompressed ${decompressed.digest}` : '')
  let stored: BlobInfo
  try {
    stored = await target.fromFile(tmp)
  } catch (err) {
    const gone = !opts.signal?.aborted && !(await fileExists(tmp))
    await dropAll()
    if (!gone) throw err
    // something removed the cache's file meanwhile (a `cache clear`): the destination alone then
    target.onError(`giving ${name} to the destination`, err)
    return null
  }
  return { stored, tmp, bytes: copied.bytes, algorithm, decompressed }
}

/**
 * The file as a stream of 1 MiB chunks for the stream's way, telling `opts.onProgress` the bytes
 * read as they are; a missing file is `BLOB_UNKNOWN`, and an abort while it opens rejects with
 * the signal's reason. The signal is not tied to the stream: the reader, which applies it,
 * hears an abort after that, and no error of the stream can fire before someone listens.
 */
export async function openLocalBlob(path: string, info: BlobInfo, opts: PutBlobOptions = {}): Promise<Readable> {
  opts.signal?.throwIfAborted()
  let handle
  try {
    handle = await open(path, 'r')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `blob ${info.digest ?? ''} (${path}): not found`, { cause: err })
    throw err
  }
  if (opts.signal?.aborted) {
    await handle.close()
    throw opts.signal.reason
  }
  const { onProgress } = opts
  let bytes = 0
  const counted = new Transform({
    highWaterMark: HIGH_WATER_MARK,
    transform(chunk: Buffer, _encoding, cb) {
      bytes += chunk.length
      onProgress?.(bytes)
      cb(null, chunk)
    },
  })
  // pipeline listens to both streams from now on; a read error reaches the reader through it
  pipeline(handle.createReadStream({ highWaterMark: HIGH_WATER_MARK }), counted, () => {})
  return counted
}
