// A blob written once: for a wrapped destination that can take a verified local file
// (putBlobFromFile: dir and oci hard-link a plain 0644 file on the same file system), the stream
// is written only to the cache's temporary file, checked against its digest, and that file is
// then given to the destination, so no byte is written twice. The cache's entry is named
// afterwards, by the caller (CacheWriter.settle), only if the destination succeeded.
import { lstat } from 'node:fs/promises'
import { addAbortSignal, Readable } from 'node:stream'
import debug from 'debug'
import { checkDigest } from '../digest.js'
import { ImageError } from '../errors.js'
import type { BlobInfo, CallOptions } from '../types.js'
import { HIGH_WATER_MARK } from './files.js'
import type { CacheWriter, WrittenFile } from './tee.js'

const log = debug('blobcache:blobcache:through-file')

/** Where {@link putThroughFile} stores the blob: the wrapped destination's two ways. */
export interface FileTarget {
  /** Stores the blob from the verified file at `path` (putBlobFromFile). */
  fromFile(path: string): Promise<BlobInfo>
  /** Stores the blob from a stream (putBlob), when the file cannot be used. */
  fromStream(stream: Readable): Promise<BlobInfo>
}

/**
 * Stores `stream` through the temporary file of `writer` (which MUST have one): every chunk
 * goes to the writer only; the bytes MUST hash to `info.digest` and have `info.size`, when
 * known (more bytes fail as soon as they arrive), or the call fails with `DIGEST_INVALID` or
 * `SIZE_INVALID` before the target sees anything; then the file is given to
 * `target.fromFile`. The cache never fails the copy because of this: if the file cannot be
 * written midway, the target gets the stream instead (the bytes already in the file, then the
 * rest), and if the file is no longer at its path when the target wants it, the target gets
 * its bytes through the open descriptor. An abort rejects with `signal.reason`. The caller
 * settles the writer.
 */
export async function putThroughFile(
  stream: Readable,
  writer: CacheWriter,
  info: BlobInfo,
  opts: CallOptions,
  target: FileTarget,
): Promise<BlobInfo> {
  const { signal } = opts
  if (signal) addAbortSignal(signal, stream)
  const chunks: AsyncIterator<Buffer> = stream[Symbol.asyncIterator]()
  try {
    for (;;) {
      const next = await chunks.next()
      if (next.done) break
      await writer.write(next.value)
      if (info.size >= 0 && writer.bytes > info.size) {
        throw new ImageError('SIZE_INVALID', `blob ${info.digest}: more than the expected ${info.size} bytes`)
      }
      if (writer.file?.failed) {
        log('cache file of %s failed: the destination reads the stream', info.digest)
        return await target.fromStream(Readable.from(replay(writer, next.value, chunks), { objectMode: false }))
      }
    }
    await writer.end()
  } catch (err) {
    stream.destroy()
    throw signal?.aborted ? signal.reason : err
  }
  checkDigest({ digest: writer.digest!, bytes: writer.bytes }, { expected: info.digest, size: info.size })
  const file = writer.file!
  if (file.failed) {
    // the last staged bytes did not reach the file
    log('cache file of %s failed at its end: the destination reads the bytes again', info.digest)
    return target.fromStream(Readable.from(replay(writer), { objectMode: false }))
  }
  try {
    return await target.fromFile(file.path)
  } catch (err) {
    if (signal?.aborted) throw signal.reason
    if (await stillAtPath(file)) throw err
    log('cache file of %s is gone from its path: the destination reads it from the descriptor', info.digest)
    const bytes = file.handle.createReadStream({ start: 0, autoClose: false, highWaterMark: HIGH_WATER_MARK })
    return target.fromStream(bytes)
  }
}

/**
 * The blob again after the cache file failed on `failed`: the bytes already in the file, read
 * back through its descriptor, and those given to it that did not reach it, then `failed`, then
 * the rest of the stream (still given to the writer, which hashes and decompresses it); without
 * `chunks`, the writer had been given the whole blob. Stopping early destroys the stream.
 */
async function* replay(writer: CacheWriter, failed?: Buffer, chunks?: AsyncIterator<Buffer>): AsyncGenerator<Buffer> {
  let finished = false
  try {
    const file = writer.file as WrittenFile
    for (let position = 0; position < file.bytes; ) {
      const piece = Buffer.allocUnsafe(Math.min(HIGH_WATER_MARK, file.bytes - position))
      const { bytesRead } = await file.handle.read(piece, 0, piece.length, position)
      if (bytesRead === 0) throw new Error(`cache file ${file.path}: ended after ${position} of ${file.bytes} bytes`)
      yield piece.subarray(0, bytesRead)
      position += bytesRead
    }
    for (const part of file.pending ?? []) yield part
    if (!failed || !chunks) {
      finished = true
      return
    }
    yield failed
    for (;;) {
      const next = await chunks.next()
      if (next.done) break
      await writer.write(next.value)
      yield next.value
    }
    finished = true
    await writer.end()
  } finally {
    if (!finished) await chunks?.return?.()
  }
}

/** True when the temporary file's path still names its (open) file. */
async function stillAtPath(file: WrittenFile): Promise<boolean> {
  try {
    const [open, named] = await Promise.all([file.handle.stat(), lstat(file.path)])
    return open.ino === named.ino && open.dev === named.dev
  } catch {
    return false
  }
}
