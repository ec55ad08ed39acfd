// The read side of the shared tier: a blob found in the tier is downloaded into a temporary file
// of the local cache directory, verified (size and digest) as it streams, renamed to its entry
// name only then, and its notes are recorded in the directory's note files. Concurrent requests
// for one blob share one download, which stops when every caller has given up.
import { type FileHandle, open, rename } from 'node:fs/promises'
import { join } from 'node:path'
import { type Readable, Transform, type TransformCallback } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import type { Digest } from '../../digest.js'
import { isImageError } from '../../errors.js'
import { openBlob } from '../../registry/download.js'
import { FILE_MODE, HIGH_WATER_MARK, entryName, removeQuietly, tempPath } from '../files.js'
import { addCompressedVariant, isNoteAlgorithm, readCompressedNote, writeDecompressedNote } from '../notes.js'
import { stampVerified } from '../stamp.js'
import { type TierCore, Watchdog, reason, showsTierUnusable } from './core.js'
import type { SharedEntry } from './format.js'

const log = debug('blobcache:blobcache:shared:fetch')

/** A blob placed in the local cache directory by the tier. */
export interface FetchedBlob {
  path: string
  name: string
  size: number
  isConfig: boolean
}

/**
 * Downloads the blob of `entry` into `dir` (see the module comment). Resolves the placed file,
 * or undefined for a miss: a wrong size or digest (counted error and a warning; nothing is
 * named), or a failing tier (counted; the breaker may open). Rejects only with `signal.reason`,
 * after the temporary file is gone.
 */
export async function downloadInto(core: TierCore, dir: string, entry: SharedEntry, signal: AbortSignal): Promise<FetchedBlob | undefined> {
  const { digest } = entry
  const isConfig = entry.kind === 'config'
  const name = entryName(digest, isConfig)
  const path = join(dir, name)
  const tmp = tempPath(dir, name)
  let handle: FileHandle | undefined
  let stream: Readable | undefined
  let watchdog: Watchdog | undefined
  try {
    // the file first: openBlob's stream may fail (a digest mismatch) as soon as its bytes are in,
    // so the pipeline must take it at once
    handle = await open(tmp, 'wx', FILE_MODE)
    watchdog = new Watchdog(core.timeoutMs, signal)
    ;({ stream } = await openBlob(core.client, core.repository, digest, entry.size, { signal: watchdog.signal, verify: true }))
    const file = handle.createWriteStream({ highWaterMark: HIGH_WATER_MARK })
    handle = undefined // the stream owns it now
    // openBlob fails the stream on a wrong size or digest before it ends: a completed pipeline is verified
    await pipeline(stream, new Progress(() => watchdog!.poke()), file, { signal: watchdog.signal })
    await rename(tmp, path)
    await stampVerified(path, entry.size)
  } catch (err) {
    stream?.destroy()
    await handle?.close().catch(() => {})
    await removeQuietly(tmp)
    if (signal.aborted) throw signal.reason
    if (watchdog?.signal.aborted) {
      core.failed(`downloading ${digest}`, watchdog.signal.reason)
    } else if (showsTierUnusable(err)) {
      core.failed(`downloading ${digest}`, err)
    } else if (!isImageError(err)) {
      core.error(`storing ${name} in ${dir}`, err) // a local failure
    } else {
      // the registry answered, but not with the blob the entry names: wrong bytes or size, or none
      core.error(`downloading ${digest}`, err)
      core.forget(digest) // not fetched again by this process
      core.warn(`shared cache ${core.name}: blob ${digest} is corrupt or missing (${reason(err)}); not used`)
    }
    return undefined
  } finally {
    watchdog?.stop()
  }
  core.counters.bytesDownloaded += entry.size
  log('fetched %s (%d bytes) into %s', digest, entry.size, dir)
  await recordNotes(core, dir, entry)
  return { path, name, size: entry.size, isConfig }
}

/**
 * Records the entry's notes in the local note files of `dir`: each compressed variant (of an
 * algorithm blobcache knows) in `<digest>.compressed`, the decompressed form in
 * `<digest>.decompressed`. Notes already there are left alone. Best effort: failures are counted.
 */
export async function recordNotes(core: TierCore, dir: string, entry: SharedEntry): Promise<void> {
  try {
    if (entry.compressed.size > 0) {
      const have = await readCompressedNote(dir, entry.digest)
      for (const [variant, algorithm] of entry.compressed) {
        if (have.has(variant) || !isNoteAlgorithm(algorithm)) continue
        await addCompressedVariant(dir, entry.digest, variant, algorithm)
      }
    }
    if (entry.decompressed) await writeDecompressedNote(dir, entry.digest, entry.decompressed)
  } catch (err) {
    core.error(`recording the notes of ${entry.digest} in ${dir}`, err)
  }
}

/** A pass-through that reports each chunk (to keep a watchdog quiet while bytes flow). */
class Progress extends Transform {
  constructor(readonly onChunk: () => void) {
    super({ highWaterMark: HIGH_WATER_MARK })
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.onChunk()
    cb(null, chunk)
  }
}

/** One download shared by the callers waiting for it. */
interface SharedDownload {
  promise: Promise<FetchedBlob | undefined>
  controller: AbortController
  waiters: number
}

/**
 * Runs one download per key at a time: callers asking for a key already being fetched wait for
 * that download. A caller's abort only stops its own wait, except that the last caller to give
 * up stops the download too, and is answered once its temporary file is removed.
 */
export class DownloadSharing {
  readonly #running = new Map<string, SharedDownload>()

  /** Waits for the download of `key`, starting it with `start` when none is running. */
  join(key: string, start: (signal: AbortSignal) => Promise<FetchedBlob | undefined>, signal?: AbortSignal): Promise<FetchedBlob | undefined> {
    if (signal?.aborted) return Promise.reject(signal.reason)
    let shared = this.#running.get(key)
    if (!shared) {
      const controller = new AbortController()
      const promise = start(controller.signal)
      const entry: SharedDownload = { promise, controller, waiters: 0 }
      promise.then(
        () => this.#forget(key, entry),
        () => this.#forget(key, entry),
      )
      this.#running.set(key, entry)
      shared = entry
    }
    const s = shared
    s.waiters++
    return new Promise<FetchedBlob | undefined>((resolve, reject) => {
      let settled = false
      const leave = () => {
        settled = true
        s.waiters--
        signal?.removeEventListener('abort', onAbort)
      }
      const onAbort = () => {
        if (settled) return
        leave()
        if (s.waiters > 0) return reject(signal!.reason)
        // the last one waiting: stop the download, answer once it has cleaned up
        this.#forget(key, s)
        s.controller.abort(signal!.reason)
        s.promise.then(
          () => reject(signal!.reason),
          () => reject(signal!.reason),
        )
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      s.promise.then(
        (found) => {
          if (settled) return
          leave()
          resolve(found)
        },
        (err: unknown) => {
          if (settled) return
          leave()
          reject(err)
        },
      )
    })
  }

  #forget(key: string, entry: SharedDownload): void {
    if (this.#running.get(key) === entry) this.#running.delete(key)
  }
}
