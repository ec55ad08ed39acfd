// A streaming tar reader (ustar, pax, GNU long names) for archives that arrive as a stream and
// are never seen whole: `imageLoad` from stdin or a pipe, and layers flattened into one file
// system. src/tar.ts indexes files; this reads headers in order and hands each entry's data to a
// callback as a stream, skipping whatever the callback does not read. Each entry also carries
// its raw header blocks, so a filter can copy entries through unchanged.
import type { Readable } from 'node:stream'
import { ImageError } from '../errors.js'
import { parsePaxRecords, parseTarNumber, tarCString, tarChecksumOk } from '../tar.js'

const BLOCK = 512
/** Largest pax or GNU long-name record accepted. */
const MAX_META = 1 << 20

/** The kind of an entry; devices, fifos and others are `other`. */
export type StreamEntryType = 'file' | 'dir' | 'symlink' | 'hardlink' | 'other'

/** One entry of a tar stream. */
export interface StreamEntry {
  /** Normalised path: no leading `./` or `/`, no empty or `.` components, no trailing `/`. */
  path: string
  /** The path exactly as the archive gives it. */
  rawPath: string
  type: StreamEntryType
  /** The type flag character of the header. */
  typeflag: string
  /** Bytes of data that follow the header. */
  size: number
  linkname: string
  mode: number
  /** True when the path has a `..` component (never to be used as a path). */
  unsafe: boolean
  /** The header blocks as read (pax or long-name blocks first), for copying the entry through. */
  headers: Buffer[]
}

const invalid = (msg: string) => new ImageError('ARCHIVE_INVALID', `invalid tar stream: ${msg}`)

/** Pulls exact byte counts out of a stream of chunks. */
class ByteReader {
  readonly #it: AsyncIterator<Buffer | string>
  #buf: Buffer = Buffer.alloc(0)
  #eof = false
  offset = 0

  constructor(stream: AsyncIterable<Buffer | string>) {
    this.#it = stream[Symbol.asyncIterator]()
  }

  async #pull(): Promise<boolean> {
    if (this.#eof) return false
    const r = await this.#it.next()
    if (r.done) {
      this.#eof = true
      return false
    }
    const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value
    this.#buf = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : chunk
    return true
  }

  /** Exactly `n` bytes, or fewer only at the end of the stream. */
  async read(n: number): Promise<Buffer> {
    while (this.#buf.length < n && (await this.#pull()));
    const out = this.#buf.subarray(0, Math.min(n, this.#buf.length))
    this.#buf = this.#buf.subarray(out.length)
    this.offset += out.length
    return out
  }

  /** The next piece of at most `n` bytes (empty only at the end of the stream). */
  async piece(n: number): Promise<Buffer> {
    if (this.#buf.length === 0 && !(await this.#pull())) return Buffer.alloc(0)
    const out = this.#buf.subarray(0, Math.min(n, this.#buf.length))
    this.#buf = this.#buf.subarray(out.length)
    this.offset += out.length
    return out
  }

  /** Drops `n` bytes; false when the stream ended first. */
  async skip(n: number): Promise<boolean> {
    let left = n
    while (left > 0) {
      const p = await this.piece(left)
      if (p.length === 0) return false
      left -= p.length
    }
    return true
  }

  async close(): Promise<void> {
    await this.#it.return?.()
  }
}

const TYPES: Record<string, StreamEntryType> = { '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '5': 'dir' }
const HEADER_ONLY = new Set(['1', '2', '3', '4', '5', '6'])

/** Normalises a tar path; `unsafe` when it climbs with `..`. */
export function normalizeTarPath(p: string): { path: string; unsafe: boolean } {
  const parts = p.split('/').filter((c) => c !== '' && c !== '.')
  return { path: parts.join('/'), unsafe: parts.includes('..') }
}

const padTo = (n: number) => (BLOCK - (n % BLOCK)) % BLOCK

/**
 * Reads the tar archive `stream` entry by entry, calling `onEntry` with each entry and a
 * stream of its data (already-read bytes excepted, whatever the callback leaves unread is
 * skipped). Resolves after the end-of-archive blocks (or the end of the stream on a block
 * boundary, as Go's archive/tar accepts). Throws `ARCHIVE_INVALID` for a bad checksum, malformed
 * records, or a stream that ends inside a header or an entry's data.
 */
export async function readTarStream(
  stream: Readable | AsyncIterable<Buffer>,
  onEntry: (entry: StreamEntry, data: AsyncIterable<Buffer>) => Promise<void>,
  opts: { signal?: AbortSignal } = {},
): Promise<void> {
  const reader = new ByteReader(stream as AsyncIterable<Buffer>)
  try {
    let pax = new Map<string, string>()
    let longName: string | undefined
    let longLink: string | undefined
    let pending: Buffer[] = []
    for (;;) {
      opts.signal?.throwIfAborted()
      const at = reader.offset
      const h = await reader.read(BLOCK)
      if (h.length === 0) return
      if (h.length < BLOCK) throw invalid(`the stream ends inside a header at byte ${at}`)
      if (h.every((b) => b === 0)) {
        // the end: read the rest (the second zero block, record padding) so a writer is not cut off
        while ((await reader.piece(1 << 20)).length > 0) opts.signal?.throwIfAborted()
        return
      }
      if (!tarChecksumOk(h)) throw invalid(`bad header checksum at byte ${at}`)
      const flag = String.fromCharCode(h[156])
      let size = parseTarNumber(h.subarray(124, 136), 'size', invalid)
      if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
        if (size > MAX_META) throw invalid(`a ${flag} record of ${size} bytes is too large`)
        const data = await reader.read(size + padTo(size))
        if (data.length < size + padTo(size)) throw invalid('the stream ends inside a header record')
        const body = data.subarray(0, size)
        if (flag === 'x') pax = parsePaxRecords(body, invalid)
        else if (flag === 'L') longName = tarCString(body)
        else if (flag === 'K') longLink = tarCString(body)
        if (flag !== 'g') pending.push(Buffer.from(h), Buffer.from(data))
        continue
      }
      if (pax.has('size')) {
        size = Number(pax.get('size'))
        if (!Number.isSafeInteger(size) || size < 0) throw invalid('bad pax size')
      }
      if (HEADER_ONLY.has(flag)) size = 0
      let rawPath = pax.get('path') ?? longName
      if (rawPath === undefined) {
        rawPath = tarCString(h.subarray(0, 100))
        const prefix = h.toString('latin1', 257, 263) === 'ustar\0' ? tarCString(h.subarray(345, 500)) : ''
        if (prefix) rawPath = `${prefix}/${rawPath}`
      }
      let type = TYPES[flag] ?? 'other'
      if (type === 'file' && flag !== '7' && rawPath.endsWith('/')) type = 'dir'
      const { path, unsafe } = normalizeTarPath(rawPath)
      const entry: StreamEntry = {
        path, rawPath, type, typeflag: flag, size, unsafe,
        linkname: pax.get('linkpath') ?? longLink ?? tarCString(h.subarray(157, 257)),
        mode: parseTarNumber(h.subarray(100, 108), 'mode', invalid) & 0o7777,
        headers: [...pending, Buffer.from(h)],
      }
      pax = new Map()
      longName = longLink = undefined
      pending = []
      let left = size
      const data = {
        async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
          while (left > 0) {
            const piece = await reader.piece(left)
            if (piece.length === 0) throw invalid(`the stream ends inside the data of ${JSON.stringify(rawPath)}`)
            left -= piece.length
            yield piece
          }
        },
      }
      await onEntry(entry, data)
      if (left > 0 && !(await reader.skip(left))) throw invalid(`the stream ends inside the data of ${JSON.stringify(rawPath)}`)
      left = 0
      const pad = padTo(size)
      if (pad && (await reader.read(pad)).length < pad) throw invalid(`the stream ends inside the padding of ${JSON.stringify(rawPath)}`)
    }
  } finally {
    await reader.close()
  }
}
