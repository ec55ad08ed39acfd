// Shared file helpers of the local transports (dir, oci, and the archive transports built on
// them): verified blob writes through a `.tmp-` file and a rename, atomic small-file writes,
// and reads that translate ENOENT into the distribution-spec codes.
import { randomBytes } from 'node:crypto'
import { constants, createReadStream } from 'node:fs'
import { chmod, copyFile, link, lstat, mkdir, open, rename, rm, stat } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { addAbortSignal, type Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, checkDigest, digestAlgorithm, digestingStream, streamDigest } from '../digest.js'
import { type ErrorCode, ImageError, errnoCode, notFound } from '../errors.js'
import { drainInto } from '../io/blob-drain.js'
import { BlobFile } from '../io/blob-file.js'
import type { CallOptions } from '../types.js'

const log = debug('blobcache:transports:fs-util')

/** Chunk size of every file stream opened here (1 MiB). */
export const HIGH_WATER_MARK = 1 << 20

/** Prefix of every temporary file; such files are never read as content. */
export const TEMP_PREFIX = '.tmp-'

/** A fresh temporary path in `dir` (same file system as the final name, so rename is atomic). */
export function tempPath(dir: string, hint = 'blob'): string {
  return join(dir, `${TEMP_PREFIX}${hint}-${randomBytes(8).toString('hex')}`)
}

/** Options of {@link writeBlob} and {@link copyBlob}. */
export interface WriteBlobOptions extends CallOptions {
  /** The digest the bytes MUST hash to; without it the sha256 of the bytes is computed. */
  expected?: Digest
  /** The exact byte count, or -1/undefined when unknown. */
  size?: number
  /** fsync the file before renaming it (as containers/image does). Default true. */
  durable?: boolean
}

/** A blob stored under its digest. */
export interface StoredBlob {
  digest: Digest
  size: number
  /** The final path. */
  path: string
  /** False when a file of the same size was already there and the new copy was discarded. */
  created: boolean
}

/** Maps a verified digest to the final path of its file; its directory MUST be the temp dir. */
export type BlobTarget = (digest: Digest) => string

/**
 * Streams `stream` into a temporary file in `tempDir` while hashing it once, then renames the
 * file to `target(digest)`. The digest (and size, when known) MUST match or the call fails with
 * `DIGEST_INVALID`/`SIZE_INVALID`; on any failure, including an abort (which rejects with
 * `signal.reason`), the temporary file is removed and nothing is named. The stream's chunks
 * MUST NOT change once emitted: they are written as they are, one `writev` at a time, and large
 * blobs are hashed on the hashing thread (see {@link BlobFile}). A durable file is flushed to
 * disk in the background as it grows, and fsynced before the rename.
 */
export async function writeBlob(stream: Readable, tempDir: string, target: BlobTarget, opts: WriteBlobOptions = {}): Promise<StoredBlob> {
  const { signal } = opts
  if (signal?.aborted) {
    stream.destroy()
    throw signal.reason
  }
  const durable = opts.durable !== false
  const size = opts.size ?? -1
  // A stream that hashes what it passes on (copyImage's verifier) is not hashed twice.
  const upstream = digestingStream(stream, opts.expected)
  const algorithm = opts.expected ? digestAlgorithm(opts.expected) : 'sha256'
  const tmp = tempPath(tempDir)
  let file: BlobFile
  try {
    file = await BlobFile.create(tmp, { algorithm: upstream ? undefined : algorithm, size, flush: durable })
  } catch (err) {
    stream.destroy()
    throw err
  }
  try {
    const what = opts.expected ? `blob ${opts.expected}` : 'blob'
    const written = await drainInto(stream, file, { size, what, signal })
    const got = upstream ? upstream[streamDigest]() : { digest: `${algorithm}:${written.hex}` as Digest, bytes: written.bytes }
    if (got.bytes !== written.bytes) {
      throw new ImageError('SIZE_INVALID', `${what}: the stream reported ${got.bytes} bytes but gave ${written.bytes}`)
    }
    checkDigest(got, opts)
    if (durable) await file.sync()
    await file.close()
    signal?.throwIfAborted()
    return await place(tmp, target(got.digest), got.digest, got.bytes)
  } catch (err) {
    stream.destroy()
    throw signal?.aborted ? signal.reason : err
  } finally {
    await file.close()
    await rm(tmp, { force: true })
  }
}

/**
 * Copies a local file whose bytes are known to hash to `opts.expected` into place through a
 * temporary file: a hard link when the file is on the same file system and a plain regular file
 * of mode 0644 (content-addressed blobs are never written in place, so the two names can share
 * one inode and no byte is copied), else `fs.copyFile` (which may clone). Without `expected` the
 * file is hashed while being copied. A wrong size fails `SIZE_INVALID` and leaves nothing.
 */
export async function copyBlob(from: string, tempDir: string, target: BlobTarget, opts: WriteBlobOptions = {}): Promise<StoredBlob> {
  if (!opts.expected) {
    const file = await stat(from)
    const stream = createReadStream(from, { highWaterMark: HIGH_WATER_MARK })
    return writeBlob(stream, tempDir, target, { ...opts, size: opts.size ?? file.size })
  }
  opts.signal?.throwIfAborted()
  const tmp = tempPath(tempDir)
  try {
    await linkOrCopy(from, tmp)
    const { size } = await stat(tmp)
    if (opts.size !== undefined && opts.size >= 0 && size !== opts.size) {
      throw new ImageError('SIZE_INVALID', `blob ${opts.expected}: ${from} has ${size} bytes, expected ${opts.size}`)
    }
    opts.signal?.throwIfAborted()
    if (opts.durable !== false) await syncFile(tmp)
    return await place(tmp, target(opts.expected), opts.expected, size)
  } finally {
    await rm(tmp, { force: true })
  }
}

/**
 * Gives `tmp` the bytes of `from`: a hard link where one can be made to a plain 0644 file (a
 * blob-cache entry, a layout's blob), else a copy with mode 0644. The mode of `from` is never
 * changed: a file of another mode, or on another file system, is copied.
 */
async function linkOrCopy(from: string, tmp: string): Promise<void> {
  try {
    const st = await lstat(from)
    if (st.isFile() && (st.mode & 0o7777) === 0o644) {
      await link(from, tmp)
      return
    }
  } catch (err) {
    log('no hard link from %s (%s): copying', from, errnoCode(err) ?? (err as Error).message)
  }
  await copyFile(from, tmp, constants.COPYFILE_FICLONE)
  await chmod(tmp, 0o644)
}

async function place(tmp: string, path: string, digest: Digest, size: number): Promise<StoredBlob> {
  if ((await fileSize(path)) === size) {
    log('already present %s', digest)
    return { digest, size, path, created: false }
  }
  await rename(tmp, path)
  log('stored %s (%d bytes)', digest, size)
  return { digest, size, path, created: true }
}

async function syncFile(path: string): Promise<void> {
  const handle = await open(path, 'r+')
  try {
    await handle.sync()
  } finally {
    await handle.close()
  }
}

/** Options of {@link writeFileAtomic}. */
export interface AtomicWriteOptions {
  /** File mode. Default 0o644. */
  mode?: number
  /** fsync before the rename. Default true. */
  durable?: boolean
}

/**
 * Replaces `path` with `data` atomically: a reader sees the old bytes or the new ones, never a
 * mix, and a failure leaves the old file and no temporary file.
 */
export async function writeFileAtomic(path: string, data: Buffer | string, opts: AtomicWriteOptions = {}): Promise<void> {
  const tmp = tempPath(dirname(path), 'write')
  try {
    const handle = await open(tmp, 'wx', opts.mode ?? 0o644)
    try {
      await handle.writeFile(data)
      if (opts.durable !== false) await handle.sync()
    } finally {
      await handle.close()
    }
    await rename(tmp, path)
  } finally {
    await rm(tmp, { force: true })
  }
}

/** The size of a regular file, or undefined when there is none at `path`. */
export async function fileSize(path: string): Promise<number | undefined> {
  try {
    const s = await stat(path)
    return s.isFile() ? s.size : undefined
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return undefined
    throw err
  }
}

/**
 * Opens a blob file for streaming in 1 MiB chunks. ENOENT becomes `BLOB_UNKNOWN`. With a
 * signal, aborting it destroys the stream with `signal.reason`.
 */
export async function openBlob(path: string, digest: Digest, opts: CallOptions = {}): Promise<{ stream: Readable; size: number }> {
  opts.signal?.throwIfAborted()
  const handle = await open(path, 'r').catch(notFound(`blob ${digest}`, 'BLOB_UNKNOWN'))
  let size: number
  try {
    const s = await handle.stat()
    if (!s.isFile()) throw new ImageError('BLOB_UNKNOWN', `blob ${digest}: not a regular file`)
    size = s.size
  } catch (err) {
    await handle.close()
    throw err
  }
  const stream = handle.createReadStream({ highWaterMark: HIGH_WATER_MARK })
  if (opts.signal) addAbortSignal(opts.signal, stream)
  return { stream, size }
}

/**
 * Reads a small file (manifest, signature, index.json) of at most `max` bytes. ENOENT becomes
 * `missing`; a larger file fails `tooLarge`.
 */
export async function readSmallFile(
  path: string,
  what: string,
  missing: ErrorCode,
  opts: CallOptions & { max?: number; tooLarge?: ErrorCode } = {},
): Promise<Buffer> {
  opts.signal?.throwIfAborted()
  const handle = await open(path, 'r').catch(notFound(what, missing))
  try {
    const { size } = await handle.stat()
    const max = opts.max ?? 4 << 20
    if (size > max) throw new ImageError(opts.tooLarge ?? 'MANIFEST_INVALID', `${what}: ${size} bytes is larger than ${max}`)
    return await handle.readFile({ signal: opts.signal })
  } finally {
    await handle.close()
  }
}

/** Creates `dir` (and parents) if missing. */
export async function ensureDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true })
}
