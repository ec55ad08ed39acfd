/**
 * A small tar implementation (POSIX ustar + pax, GNU long names) for the archive transports.
 *
 * Reading never extracts: {@link openTarIndex} scans the 512-byte headers of an uncompressed tar
 * file, seeking past the data, and serves each entry as a range read of the archive file.
 * Writing ({@link writeTar}) streams a deterministic ustar archive.
 */
import { randomBytes } from 'node:crypto'
import { open as openFile, rename, rm, stat, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import { ImageError, type ErrorCode } from './errors.js'
import { BlobFile } from './io/blob-file.js'
import { DirectWriter } from './io/direct-write.js'

const log = debug('blobcache:tar')

const BLOCK = 512
const CHUNK = 1 << 20
/** Largest pax or GNU long-name record accepted while indexing. */
const MAX_META = 1 << 20
/** Links followed in one lookup before giving up (a loop). */
const MAX_LINK_DEPTH = 16
/** Default limit of {@link TarIndex.readFile}. */
export const TAR_READ_FILE_MAX = 4 << 20

/** The kind of a tar entry; character and block devices, fifos and sparse files are `other`. */
export type TarEntryType = 'file' | 'dir' | 'symlink' | 'hardlink' | 'other'

/** One entry of an indexed archive. */
export interface TarEntry {
  /** Normalised path: no leading `./` or `/`, no `//`, and a trailing `/` for directories. */
  path: string
  type: TarEntryType
  /** Data size in bytes (0 for links and directories). */
  size: number
  /** Offset of the data in the archive file. */
  offset: number
  /** Link target for symlinks (relative to the link's directory) and hardlinks (to the root). */
  linkname?: string
  mode: number
  /** Modification time, seconds since the epoch. */
  mtime: number
}

/** Options of {@link TarIndex.open} and {@link TarIndex.readFile}. */
export interface TarOpenOptions {
  /** Code of the error thrown when no entry has the path. Default `ARCHIVE_INVALID`. */
  notFoundCode?: ErrorCode
}

/** Options of {@link TarIndex.open}: an optional byte range within the entry. */
export interface TarRangeOptions extends TarOpenOptions {
  /** First byte to read, relative to the entry's data. Default 0. */
  start?: number
  /** Bytes to read from `start`; -1 or undefined means to the end of the entry. */
  length?: number
}

/** An indexed tar file; entries are read by range, the archive is never extracted. */
export interface TarIndex {
  /** The archive file. */
  readonly file: string
  /**
   * Identifies the indexed version of the file (device, inode, size, mtime): equal strings mean
   * the same bytes, so it keys caches of values computed from entries.
   */
  readonly identity: string
  /**
   * Every entry by normalised path. Duplicates: the last entry of a path wins, as when tar
   * extracts the archive.
   */
  readonly entries: Map<string, TarEntry>
  /** True when an entry (of any type) is named `path`; links are not followed. */
  has(path: string): boolean
  /**
   * Looks `path` up, following symlinks and hardlinks (also in parent components) inside the
   * archive only. Resolves undefined when nothing is there; throws `ARCHIVE_INVALID` for a link
   * that leaves the archive (absolute target, `..` above the root) or a loop.
   */
  resolve(path: string): TarEntry | undefined
  /**
   * Opens the data of a regular file (after {@link resolve}) as a stream of 1 MiB chunks. Throws
   * `opts.notFoundCode` when there is no such entry, `ARCHIVE_INVALID` for a non-file, and
   * `SIZE_INVALID` for a range outside the entry; the stream fails `ARCHIVE_INVALID` when the
   * archive file changed since it was indexed.
   */
  open(path: string, opts?: TarRangeOptions): Readable
  /**
   * Reads a small regular file into memory. Throws `ARCHIVE_INVALID` when it is larger than
   * `maxBytes` (default {@link TAR_READ_FILE_MAX}, 4 MiB).
   */
  readFile(path: string, opts?: TarOpenOptions & { maxBytes?: number; signal?: AbortSignal }): Promise<Buffer>
}

const invalid = (file: string, msg: string) => new ImageError('ARCHIVE_INVALID', `${file}: invalid tar archive: ${msg}`)

/** Splits a tar path into clean components, or returns undefined when it is absolute or has `..`. */
function cleanParts(p: string): string[] | undefined {
  if (p.startsWith('/') || p.includes('\0')) return undefined
  const parts = p.split('/').filter((c) => c !== '' && c !== '.')
  return parts.includes('..') ? undefined : parts
}

/** Joins `target` onto the components `base`, resolving `..`; undefined when it climbs above the root. */
function joinInside(base: string[], target: string): string[] | undefined {
  if (target.startsWith('/') || target.includes('\0')) return undefined
  const out = [...base]
  for (const c of target.split('/')) {
    if (c === '' || c === '.') continue
    if (c === '..') {
      if (out.length === 0) return undefined
      out.pop()
    } else out.push(c)
  }
  return out
}

/** Reads a numeric header field (octal, or GNU base-256); `fail` makes the error for a bad one. */
export function parseTarNumber(b: Buffer, field: string, fail: (msg: string) => Error): number {
  if (b[0] & 0x80) {
    // base-256 (GNU): big-endian two's complement with the top bit of the first byte set
    if (b[0] === 0xff) throw fail(`negative ${field}`)
    let v = b[0] & 0x7f
    for (let i = 1; i < b.length; i++) {
      v = v * 256 + b[i]
      if (!Number.isSafeInteger(v)) throw fail(`${field} too large`)
    }
    return v
  }
  const s = b.toString('latin1').replace(/[\0 ].*$/s, '').trim()
  if (s === '') return 0
  if (!/^[0-7]+$/.test(s)) throw fail(`bad ${field} field ${JSON.stringify(s)}`)
  const v = parseInt(s, 8)
  if (!Number.isSafeInteger(v)) throw fail(`${field} too large`)
  return v
}

/** A NUL-terminated header string. */
export const tarCString = (b: Buffer) => {
  const z = b.indexOf(0)
  return b.toString('utf8', 0, z < 0 ? b.length : z)
}

/** Whether a 512-byte header's checksum matches (unsigned or signed sum, as tar writers differ). */
export function tarChecksumOk(h: Buffer): boolean {
  const stored = parseInt(h.toString('latin1', 148, 156).replace(/[\0 ].*$/s, '').trim() || 'x', 8)
  let unsigned = 0
  let signed = 0
  for (let i = 0; i < BLOCK; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : h[i]
    unsigned += c
    signed += c > 127 ? c - 256 : c
  }
  return stored === unsigned || stored === signed
}

/** Parses pax extended-header records (`<len> key=value\n`); `fail` makes the error for a bad one. */
export function parsePaxRecords(data: Buffer, fail: (msg: string) => Error): Map<string, string> {
  const out = new Map<string, string>()
  let pos = 0
  while (pos < data.length) {
    if (data[pos] === 0) break
    const sp = data.indexOf(0x20, pos)
    const len = sp < 0 ? NaN : Number(data.toString('latin1', pos, sp))
    if (!Number.isSafeInteger(len) || len <= sp - pos || pos + len > data.length || data[pos + len - 1] !== 0x0a) {
      throw fail('malformed pax record')
    }
    const rec = data.toString('utf8', sp + 1, pos + len - 1)
    const eq = rec.indexOf('=')
    if (eq <= 0) throw fail('malformed pax record')
    out.set(rec.slice(0, eq), rec.slice(eq + 1))
    pos += len
  }
  return out
}

const TYPES: Record<string, TarEntryType> = {
  '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '5': 'dir', D: 'dir',
}
/** Types whose header's size field announces no data (as in Go's archive/tar). */
const HEADER_ONLY = new Set(['1', '2', '3', '4', '5', '6'])

/**
 * Indexes an uncompressed tar file without reading its data. Throws `ARCHIVE_INVALID` for a bad
 * checksum, a truncated archive (a header or data past the end of the file), an entry with an
 * absolute path or a `..` component, or malformed pax/GNU records; fs errors (ENOENT…) propagate.
 */
export async function openTarIndex(file: string, opts: { signal?: AbortSignal } = {}): Promise<TarIndex> {
  const st = await stat(file)
  if (!st.isFile()) throw invalid(file, 'not a regular file')
  const fh = await openFile(file, 'r')
  const entries = new Map<string, TarEntry>()
  const fail = (msg: string) => invalid(file, msg)
  try {
    const readAt = async (pos: number, len: number): Promise<Buffer> => {
      const buf = Buffer.alloc(len)
      const { bytesRead } = await fh.read(buf, 0, len, pos)
      if (bytesRead !== len) throw invalid(file, `unexpected end of file at offset ${pos}`)
      return buf
    }
    let pos = 0
    let pax = new Map<string, string>()
    let longName: string | undefined
    let longLink: string | undefined
    for (let n = 0; ; n++) {
      if (n % 256 === 0) opts.signal?.throwIfAborted()
      if (pos === st.size) break // no end-of-archive blocks: accepted, as Go's archive/tar does
      if (pos + BLOCK > st.size) throw invalid(file, `truncated header at offset ${pos}`)
      const h = await readAt(pos, BLOCK)
      if (h.every((b) => b === 0)) break
      if (!tarChecksumOk(h)) throw invalid(file, `bad header checksum at offset ${pos}`)
      const flag = String.fromCharCode(h[156])
      let size = parseTarNumber(h.subarray(124, 136), 'size', fail)
      const offset = pos + BLOCK
      if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
        if (size > MAX_META) throw invalid(file, `${flag} record of ${size} bytes is too large`)
        if (offset + size > st.size) throw invalid(file, `data of a ${flag} record runs past the end of the file`)
        const data = await readAt(offset, size)
        if (flag === 'x') pax = parsePaxRecords(data, fail)
        else if (flag === 'L') longName = tarCString(data)
        else if (flag === 'K') longLink = tarCString(data)
        pos = offset + Math.ceil(size / BLOCK) * BLOCK
        continue
      }
      if (pax.has('size')) {
        size = Number(pax.get('size'))
        if (!Number.isSafeInteger(size) || size < 0) throw invalid(file, 'bad pax size')
      }
      if (HEADER_ONLY.has(flag)) size = 0
      const dataEnd = offset + Math.ceil(size / BLOCK) * BLOCK
      const magic = h.toString('latin1', 257, 263)
      let name = pax.get('path') ?? longName
      if (name === undefined) {
        name = tarCString(h.subarray(0, 100))
        const prefix = magic === 'ustar\0' ? tarCString(h.subarray(345, 500)) : ''
        if (prefix) name = `${prefix}/${name}`
      }
      const linkname = pax.get('linkpath') ?? longLink ?? tarCString(h.subarray(157, 257))
      const paxMtime = pax.get('mtime')
      pax = new Map()
      longName = longLink = undefined
      if (dataEnd > st.size) throw invalid(file, `data of ${JSON.stringify(name)} (${size} bytes) runs past the end of the file`)
      let type = TYPES[flag] ?? 'other'
      if (type === 'file' && flag !== '7' && name.endsWith('/')) type = 'dir' // old tar
      const parts = cleanParts(name)
      if (!parts) throw invalid(file, `entry ${JSON.stringify(name)} has an absolute path or a ".." component`)
      pos = dataEnd
      if (parts.length === 0) continue // the root directory itself
      const key = parts.join('/') + (type === 'dir' ? '/' : '')
      const entry: TarEntry = {
        path: key, type, size, offset,
        mode: parseTarNumber(h.subarray(100, 108), 'mode', fail) & 0o7777,
        mtime: paxMtime !== undefined ? Math.floor(Number(paxMtime)) || 0 : parseTarNumber(h.subarray(136, 148), 'mtime', fail),
      }
      if (type === 'symlink' || type === 'hardlink') entry.linkname = linkname
      entries.delete(type === 'dir' ? key.slice(0, -1) : key + '/') // last one wins, also across types
      entries.delete(key) // keep insertion order = archive order of the winner
      entries.set(key, entry)
    }
  } finally {
    await fh.close()
  }
  log('indexed %s: %d entries', file, entries.size)
  return new Index(file, entries, st.dev, st.ino, st.size, st.mtimeMs)
}

class Index implements TarIndex {
  constructor(
    readonly file: string,
    readonly entries: Map<string, TarEntry>,
    private readonly dev: number,
    private readonly ino: number,
    private readonly size: number,
    private readonly mtimeMs: number,
  ) {}

  get identity(): string {
    return `${this.dev}:${this.ino}:${this.size}:${this.mtimeMs}`
  }

  #lookup(parts: string[]): TarEntry | undefined {
    const key = parts.join('/')
    return this.entries.get(key) ?? this.entries.get(key + '/')
  }

  has(path: string): boolean {
    const parts = cleanParts(path)
    return parts !== undefined && parts.length > 0 && this.#lookup(parts) !== undefined
  }

  resolve(path: string): TarEntry | undefined {
    let parts = cleanParts(path)
    if (!parts) throw invalid(this.file, `path ${JSON.stringify(path)} leaves the archive`)
    let depth = 0
    restart: for (;;) {
      for (let i = 1; i <= parts.length; i++) {
        const e = this.#lookup(parts.slice(0, i))
        if (!e) {
          if (i === parts.length) return undefined
          continue // a parent directory need not have an entry of its own
        }
        if (e.type !== 'symlink' && e.type !== 'hardlink') {
          if (i === parts.length) return e
          continue
        }
        if (++depth > MAX_LINK_DEPTH) throw invalid(this.file, `too many levels of links at ${JSON.stringify(path)}`)
        const base = e.type === 'symlink' ? parts.slice(0, i - 1) : []
        const target = joinInside(base, e.linkname ?? '')
        if (!target) throw invalid(this.file, `link ${JSON.stringify(e.path)} -> ${JSON.stringify(e.linkname)} leaves the archive`)
        parts = [...target, ...parts.slice(i)]
        if (parts.length === 0) return undefined // a link to the root
        continue restart
      }
      return undefined
    }
  }

  #file(path: string, opts: TarOpenOptions): TarEntry {
    const e = this.resolve(path)
    if (!e) throw new ImageError(opts.notFoundCode ?? 'ARCHIVE_INVALID', `${this.file}: no entry ${JSON.stringify(path)} in the archive`)
    if (e.type !== 'file') throw invalid(this.file, `${JSON.stringify(path)} is a ${e.type}, not a regular file`)
    return e
  }

  open(path: string, opts: TarRangeOptions = {}): Readable {
    const e = this.#file(path, opts)
    const start = opts.start ?? 0
    const length = opts.length === undefined || opts.length < 0 ? e.size - start : opts.length
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || start + length > e.size) {
      throw new ImageError('SIZE_INVALID', `${this.file}: range ${start}+${length} is outside ${JSON.stringify(path)} (${e.size} bytes)`)
    }
    const identity = { dev: this.dev, ino: this.ino, size: this.size, mtimeMs: this.mtimeMs }
    return new EntryStream(this.file, e.path, e.offset + start, length, identity)
  }

  async readFile(path: string, opts: TarOpenOptions & { maxBytes?: number; signal?: AbortSignal } = {}): Promise<Buffer> {
    const e = this.#file(path, opts)
    const max = opts.maxBytes ?? TAR_READ_FILE_MAX
    if (e.size > max) throw invalid(this.file, `${JSON.stringify(path)} is ${e.size} bytes, more than the ${max} allowed`)
    opts.signal?.throwIfAborted()
    const stream = this.open(path, opts)
    const chunks: Buffer[] = []
    for await (const c of stream) {
      if (opts.signal?.aborted) {
        stream.destroy()
        throw opts.signal.reason
      }
      chunks.push(c as Buffer)
    }
    return Buffer.concat(chunks)
  }
}

/** Reads one entry's bytes by position, after checking the archive is the file that was indexed. */
class EntryStream extends Readable {
  #fh: FileHandle | undefined
  #pos: number
  #left: number

  constructor(
    private readonly file: string,
    private readonly path: string,
    offset: number,
    length: number,
    private readonly identity: { dev: number; ino: number; size: number; mtimeMs: number },
  ) {
    super({ highWaterMark: CHUNK })
    this.#pos = offset
    this.#left = length
  }

  override _construct(cb: (err?: Error | null) => void): void {
    openFile(this.file, 'r')
      .then(async (fh) => {
        this.#fh = fh
        const st = await fh.stat()
        const id = this.identity
        if (st.dev !== id.dev || st.ino !== id.ino || st.size !== id.size || st.mtimeMs !== id.mtimeMs) {
          throw invalid(this.file, 'the archive changed since it was indexed')
        }
      })
      .then(() => cb(), cb)
  }

  override _read(): void {
    if (this.#left === 0) {
      this.push(null)
      return
    }
    const len = Math.min(this.#left, CHUNK)
    const buf = Buffer.allocUnsafe(len)
    this.#fh!.read(buf, 0, len, this.#pos).then(({ bytesRead }) => {
      if (bytesRead === 0) throw invalid(this.file, `unexpected end of file reading ${JSON.stringify(this.path)}`)
      this.#pos += bytesRead
      this.#left -= bytesRead
      this.push(bytesRead === len ? buf : buf.subarray(0, bytesRead))
      if (this.#left === 0) this.push(null)
    }).catch((err: Error) => this.destroy(err))
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    const fh = this.#fh
    this.#fh = undefined
    if (!fh) cb(err)
    else fh.close().then(() => cb(err), () => cb(err))
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

/** Fields shared by every entry written by {@link writeTar}. */
interface TarWriteBase {
  /** Relative path with `/` separators; no `..`. */
  path: string
  /** Permission bits. Default 0o644 for files, 0o755 for directories, 0o777 for symlinks. */
  mode?: number
  /** Modification time (seconds or Date). Default 0, so output is deterministic. */
  mtime?: number | Date
}

/** One entry for {@link writeTar}: a regular file, a directory or a symlink. */
export type TarWriteEntry =
  | (TarWriteBase & {
      type?: 'file'
      /** Exact byte count the stream MUST yield. */
      size: number
      /** Opens the data; called once, when the entry is written. */
      open?: () => Readable | Promise<Readable>
      /** Alias of `open`. */
      stream?: () => Readable | Promise<Readable>
    })
  | (TarWriteBase & { type: 'dir' })
  | (TarWriteBase & { type: 'symlink'; linkname: string })

const isAscii = (s: string) => /^[\x20-\x7e]*$/.test(s)
const MAX_OCTAL_SIZE = 0o77777777777

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`
  const bodyLen = Buffer.byteLength(body)
  let len = bodyLen + 1
  while (bodyLen + String(len).length !== len) len = bodyLen + String(len).length
  return Buffer.from(`${len}${body}`)
}

function octal(h: Buffer, value: number, off: number, width: number): void {
  h.write(value.toString(8).padStart(width - 1, '0') + '\0', off, width, 'latin1')
}

function header(name: string, flag: string, size: number, mode: number, mtime: number, linkname = ''): Buffer {
  const h = Buffer.alloc(BLOCK)
  h.write(name, 0, 100, 'utf8')
  octal(h, mode, 100, 8)
  octal(h, 0, 108, 8)
  octal(h, 0, 116, 8)
  if (size <= MAX_OCTAL_SIZE) octal(h, size, 124, 12)
  else {
    // base-256 for sizes of 8 GiB and more (the pax `size` record says the same)
    let v = size
    for (let i = 135; i > 124; i--, v = Math.floor(v / 256)) h[i] = v % 256
    h[124] = 0x80
  }
  octal(h, mtime, 136, 12)
  h[156] = flag.charCodeAt(0)
  h.write(linkname, 157, 100, 'utf8')
  h.write('ustar\x0000', 257, 8, 'latin1')
  octal(h, 0, 329, 8)
  octal(h, 0, 337, 8)
  h.fill(0x20, 148, 156)
  let sum = 0
  for (const b of h) sum += b
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1')
  return h
}

/** The header block(s) of one entry: a pax header first when names or sizes do not fit ustar. */
function headersFor(path: string, flag: string, size: number, mode: number, mtime: number, linkname = ''): Buffer[] {
  const records: Buffer[] = []
  let name = path
  if (!isAscii(path) || Buffer.byteLength(path) > 100) {
    records.push(paxRecord('path', path))
    name = path.slice(0, 99).replace(/[^\x20-\x7e]/g, '_')
  }
  let link = linkname
  if (!isAscii(linkname) || Buffer.byteLength(linkname) > 100) {
    records.push(paxRecord('linkpath', linkname))
    link = linkname.slice(0, 99).replace(/[^\x20-\x7e]/g, '_')
  }
  if (size > MAX_OCTAL_SIZE) records.push(paxRecord('size', String(size)))
  const out: Buffer[] = []
  if (records.length) {
    const data = Buffer.concat(records)
    const base = path.replace(/\/$/, '').split('/').pop()!.slice(0, 80).replace(/[^\x20-\x7e]/g, '_')
    out.push(header(`PaxHeaders/${base}`, 'x', data.length, 0o644, mtime), data, padding(data.length))
  }
  out.push(header(name, flag, size, mode, mtime, link))
  return out
}

const padding = (size: number) => Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK)

async function* tarBlocks(entries: AsyncIterable<TarWriteEntry> | Iterable<TarWriteEntry>): AsyncGenerator<Buffer> {
  for await (const e of entries) {
    const parts = cleanParts(e.path)
    if (!parts || parts.length === 0) throw new ImageError('ARCHIVE_INVALID', `cannot write tar entry ${JSON.stringify(e.path)}`)
    const mtime = Math.max(0, Math.floor(e.mtime instanceof Date ? e.mtime.getTime() / 1000 : (e.mtime ?? 0)))
    const path = parts.join('/')
    if (e.type === 'dir') {
      yield* headersFor(path + '/', '5', 0, e.mode ?? 0o755, mtime)
      continue
    }
    if (e.type === 'symlink') {
      yield* headersFor(path, '2', 0, e.mode ?? 0o777, mtime, e.linkname)
      continue
    }
    if (!Number.isSafeInteger(e.size) || e.size < 0) throw new ImageError('SIZE_INVALID', `tar entry ${path}: bad size ${e.size}`)
    const opener = e.open ?? e.stream
    if (!opener) throw new ImageError('ARCHIVE_INVALID', `tar entry ${path} has no data`)
    yield* headersFor(path, '0', e.size, e.mode ?? 0o644, mtime)
    const src = await opener()
    let seen = 0
    try {
      for await (const chunk of src) {
        const buf = typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer)
        seen += buf.length
        if (seen > e.size) throw new ImageError('SIZE_INVALID', `tar entry ${path}: more than the declared ${e.size} bytes`)
        yield buf
      }
    } finally {
      if (!src.destroyed) src.destroy()
    }
    if (seen !== e.size) throw new ImageError('SIZE_INVALID', `tar entry ${path}: got ${seen} bytes, declared ${e.size}`)
    yield padding(e.size)
  }
  yield Buffer.alloc(2 * BLOCK)
}

/**
 * Streams a ustar archive of `entries` into `out` and ends it; resolves once `out` has finished.
 * Output is deterministic: uid/gid 0, empty user and group names, mtime 0 unless given. A pax
 * header carries names and link targets longer than 100 bytes or not ASCII, and sizes of 8 GiB
 * and more. Each file's stream MUST yield exactly `size` bytes, else `SIZE_INVALID`.
 */
export async function writeTar(
  entries: AsyncIterable<TarWriteEntry> | Iterable<TarWriteEntry>,
  out: Writable,
  opts: { signal?: AbortSignal } = {},
): Promise<void> {
  try {
    await pipeline(Readable.from(tarBlocks(entries), { objectMode: false, highWaterMark: CHUNK }), out, { signal: opts.signal })
  } catch (err) {
    if (opts.signal?.aborted) throw opts.signal.reason
    throw err
  }
}

/**
 * Writes a tar file atomically: the archive goes to `.tmp-<name>-<random>` beside `target`, is
 * synced, and is renamed over `target` (replacing any file there). On any failure or abort
 * (which rejects with `signal.reason`) the temp file is removed and `target` is untouched.
 */
export async function writeTarFile(
  target: string,
  entries: AsyncIterable<TarWriteEntry> | Iterable<TarWriteEntry>,
  opts: { signal?: AbortSignal } = {},
): Promise<void> {
  const { signal } = opts
  signal?.throwIfAborted()
  const tmp = join(dirname(target), `.tmp-${basename(target)}-${randomBytes(8).toString('hex')}`)
  try {
    await writeDurably(tmp, entries, signal)
    signal?.throwIfAborted()
    await rename(tmp, target)
    log('wrote %s', target)
  } catch (err) {
    throw signal?.aborted ? signal.reason : err
  } finally {
    await rm(tmp, { force: true })
  }
}

/**
 * Writes the archive into the new file `path` and fsyncs it. Where the file system allows, with
 * O_DIRECT (see {@link DirectWriter}): an archive is rarely read back at once, and written
 * through the page cache it costs fresh pages, and then a final fsync of everything (on the
 * development VM, oci -> oci-archive took 0.44 s this way, against 0.57 s with background
 * flushes and 0.50 s with neither, alternated with skopeo). Otherwise through the page cache,
 * flushed to disk in the background as it grows (see {@link BlobFile}).
 */
async function writeDurably(path: string, entries: AsyncIterable<TarWriteEntry> | Iterable<TarWriteEntry>, signal?: AbortSignal): Promise<void> {
  const handle = await openFile(path, 'wx', 0o644)
  let direct: DirectWriter | undefined
  try {
    // with BLOBCACHE_DIRECT_IO=1, open rejects where there are no direct writes: that setting
    // checks the cache's files, and an archive is then written without them
    direct = await DirectWriter.open(handle).catch(() => undefined)
    if (direct) {
      const writer = direct
      const sink = new Writable({
        highWaterMark: CHUNK,
        write(chunk: Buffer, _encoding, cb) {
          writer.write(chunk).then(() => cb(), cb)
        },
        final(cb) {
          writer.end().then(() => cb(), cb)
        },
      })
      await writeTar(entries, sink, { signal })
      await handle.sync()
      return
    }
  } finally {
    await direct?.close()
    await handle.close()
  }
  await rm(path, { force: true })
  const file = await BlobFile.create(path, { flush: true })
  try {
    // the blocks are fresh buffers (headers, padding, reads of the entries), never changed after
    const sink = new Writable({
      highWaterMark: CHUNK,
      write(chunk: Buffer, _encoding, cb) {
        if (file.failure) return cb(file.failure)
        if (file.write(chunk, () => cb())) cb()
      },
      final(cb) {
        file.finish().then(() => cb(), cb)
      },
    })
    await writeTar(entries, sink, { signal })
    await file.sync()
  } finally {
    await file.close()
  }
}
