// Reading a blob stream into a BlobFile: the stream's chunks go to the file as they are (no
// intermediate streams, no copies), with the file's back-pressure, a size check as bytes arrive,
// and the abort signal.
import { type Readable, finished } from 'node:stream'
import { ImageError } from '../errors.js'
import type { BlobFile } from './blob-file.js'

/** Options of {@link drainInto}. */
export interface DrainOptions {
  /** The exact byte count, or -1/undefined when unknown: more bytes fail at once. */
  size?: number
  /** Names the blob in error messages, e.g. `blob sha256:…`. Default `blob`. */
  what?: string
  signal?: AbortSignal
}

/**
 * Writes every chunk of `stream` to `file` and resolves what {@link BlobFile.finish} resolves
 * once the stream has ended and every byte is written (and hashed, when the file hashes). The
 * stream's chunks MUST NOT change once emitted. Rejects with the stream's error, the file's,
 * `SIZE_INVALID` as soon as more than `size` bytes arrive, `BLOB_UNKNOWN` when the stream closes
 * before its end without an error, or `signal.reason`; the stream is destroyed with that error
 * then, and the caller closes the file.
 */
export function drainInto(stream: Readable, file: BlobFile, opts: DrainOptions = {}): Promise<{ bytes: number; hex?: string }> {
  const { signal } = opts
  const size = opts.size ?? -1
  const what = opts.what ?? 'blob'
  return new Promise((resolve, reject) => {
    let bytes = 0
    let done = false
    const settle = () => {
      done = true
      signal?.removeEventListener('abort', onAbort)
    }
    const fail = (err: unknown) => {
      if (done) return
      settle()
      // with the error, as `pipeline` would: a copy feeding the stream then fails with the cause
      stream.destroy(err as Error)
      reject(err)
    }
    const onAbort = () => fail(signal!.reason)
    const resume = () => {
      if (!done) stream.resume()
    }
    stream.on('data', (data: Buffer | string) => {
      if (done) return
      const chunk = typeof data === 'string' ? Buffer.from(data) : data
      bytes += chunk.length
      if (size >= 0 && bytes > size) return fail(new ImageError('SIZE_INVALID', `${what}: more than the expected ${size} bytes`))
      if (file.failure) return fail(file.failure)
      if (!file.write(chunk, resume)) stream.pause()
    })
    // `finished` also reports a stream that failed or ended before it was handed over here
    finished(stream, { writable: false }, (err) => {
      if ((err as NodeJS.ErrnoException | undefined)?.code === 'ERR_STREAM_PREMATURE_CLOSE') {
        return fail(new ImageError('BLOB_UNKNOWN', `${what}: the stream closed before its end`, { cause: err }))
      }
      if (err) return fail(err)
      file.finish().then((written) => {
        if (done) return
        settle()
        resolve(written)
      }, fail)
    })
    // only now: the listener `finished` added hears the error the stream is destroyed with (a
    // copy's pipeline may have let go of the stream already, and an error nobody hears throws)
    if (signal?.aborted) return onAbort()
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}
