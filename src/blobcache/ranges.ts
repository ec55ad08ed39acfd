// Byte ranges of a blob (ImageSource.getBlobAt): from a cached file, where every range is an
// independent positional read, or from a plain blob stream for a source that cannot read
// ranges itself, where ranges are cut out of one sequential read (reopened for a range that
// starts before the current position).
import type { FileHandle } from 'node:fs/promises'
import { open } from 'node:fs/promises'
import { Readable, finished } from 'node:stream'
import { ImageError } from '../errors.js'
import type { BlobChunk, CallOptions } from '../types.js'
import { HIGH_WATER_MARK, READ_NOFOLLOW } from './files.js'

/** Throws `SIZE_INVALID` for a chunk that is malformed or, with a known size, out of range. */
export function checkChunk(c: BlobChunk, size: number): void {
  const ok = Number.isSafeInteger(c.offset) && c.offset >= 0 && Number.isSafeInteger(c.length) && c.length >= -1
  if (!ok) throw new ImageError('SIZE_INVALID', `invalid chunk offset ${c.offset} length ${c.length}`)
  const end = c.length === -1 ? c.offset : c.offset + c.length
  if (size >= 0 && end > size) {
    throw new ImageError('SIZE_INVALID', `chunk offset ${c.offset} length ${c.length} is beyond the end of the ${size}-byte blob`)
  }
}

/**
 * Yields one stream per chunk, in order, read from the file at `path` (opened once, so a
 * concurrent removal does not matter). Length -1 means to the end of the file. Streams may be
 * consumed in any order or concurrently; the file is closed once every stream has closed.
 */
export async function* fileRanges(path: string, chunks: BlobChunk[], opts: CallOptions = {}): AsyncGenerator<Readable> {
  const handle = await open(path, READ_NOFOLLOW)
  let refs = 1 // the generator itself holds a reference until it ends
  const release = () => {
    if (--refs === 0) handle.close().catch(() => {})
  }
  try {
    const { size } = await handle.stat()
    for (const c of chunks) checkChunk(c, size)
    for (const c of chunks) {
      opts.signal?.throwIfAborted()
      yield rangeStream(handle, c, release, () => refs++)
    }
  } finally {
    release()
  }
}

function rangeStream(handle: FileHandle, c: BlobChunk, release: () => void, retain: () => void): Readable {
  retain()
  if (c.length === 0) {
    const empty = Readable.from([])
    finished(empty, () => release())
    return empty
  }
  const stream = handle.createReadStream({
    start: c.offset,
    end: c.length === -1 ? undefined : c.offset + c.length - 1,
    autoClose: false,
    highWaterMark: HIGH_WATER_MARK,
  })
  // With autoClose: false the stream is not destroyed at its end, so it never emits 'close'
  // when read to the end: waiting for 'close' alone leaked the file handle of every getBlobAt
  // on a cached file. finished() fires on end, error or premature close, whichever comes first.
  let released = false
  finished(stream, () => {
    if (!released) release()
    released = true
  })
  return stream
}

/**
 * Serves chunks from a blob stream opened by `openBlob`, reading it sequentially. A chunk that
 * starts before the current position reopens the blob. As with Go's getBlobAt, the next chunk
 * is read only after the previous chunk's stream has closed (ended or destroyed). A blob that
 * ends before a chunk does fails that chunk's stream with `SIZE_INVALID`.
 */
export async function* streamRanges(openBlob: () => Promise<Readable>, chunks: BlobChunk[], opts: CallOptions = {}): AsyncGenerator<Readable> {
  for (const c of chunks) checkChunk(c, -1)
  let reader: SequentialReader | undefined
  try {
    for (const c of chunks) {
      opts.signal?.throwIfAborted()
      if (!reader || reader.position > c.offset) {
        reader?.close()
        reader = new SequentialReader(await openBlob())
      }
      const r = reader
      await r.skip(c.offset - r.position)
      const out = Readable.from(r.take(c.length), { objectMode: false })
      yield out
      await new Promise<void>((resolve) => finished(out, () => resolve()))
    }
  } finally {
    reader?.close()
  }
}

/** Reads a stream in order, handing out exact byte counts. */
class SequentialReader {
  position = 0
  readonly #stream: Readable
  readonly #iterator: AsyncIterator<Buffer>
  #pending: Buffer | null = null

  constructor(stream: Readable) {
    this.#stream = stream
    this.#iterator = stream[Symbol.asyncIterator]()
  }

  /** Up to `max` bytes (any amount when -1), or null at the end. */
  async read(max: number): Promise<Buffer | null> {
    let buf = this.#pending
    this.#pending = null
    if (!buf) {
      const next = await this.#iterator.next()
      if (next.done) return null
      buf = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value)
    }
    if (max >= 0 && buf.length > max) {
      this.#pending = buf.subarray(max)
      buf = buf.subarray(0, max)
    }
    this.position += buf.length
    return buf
  }

  async skip(n: number): Promise<void> {
    while (n > 0) {
      const buf = await this.read(n)
      if (!buf) throw new ImageError('SIZE_INVALID', `blob ended before offset ${this.position + n}`)
      n -= buf.length
    }
  }

  async *take(length: number): AsyncGenerator<Buffer> {
    let left = length
    while (left !== 0) {
      const buf = await this.read(left)
      if (!buf) {
        if (length === -1) return
        throw new ImageError('SIZE_INVALID', `blob ended ${left} bytes before the end of a chunk`)
      }
      if (left > 0) left -= buf.length
      yield buf
    }
  }

  close(): void {
    this.#stream.destroy()
  }
}
