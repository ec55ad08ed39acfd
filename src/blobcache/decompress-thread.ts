// Decompressing gzip layers on a thread of its own. The cache stores the decompressed form of
// every gzip layer it sees; on the main thread that cost a cold copy of 4 x 41 MiB layers about
// 550 ms of main-thread time (sha256 of 256 MiB, zlib's callbacks, 256 writes and their garbage)
// while the main thread also had to read and write the layers. Here the main thread only copies
// the compressed bytes into shared memory; a worker thread inflates (on libuv's pool, as
// before), hashes and writes the `.tmp-` file. The bytes travel in plain ArrayBuffers that are
// transferred to the thread and back, and reused: V8 copies into shared memory several times
// slower than into a plain buffer (61 ms against about 10 ms of main thread for 164 MiB).
import type { Worker } from 'node:worker_threads'
import debug from 'debug'
import type { Digest } from '../digest.js'
import { REMOTE_FILE_SYSTEM_TYPES } from '../io/direct-write.js'
import { startScriptWorker } from '../io/script-worker.js'
import { removeQuietly, tempPath } from './files.js'
import type { CacheErrorHandler, Decompression, DerivedFile } from './variants.js'

const log = debug('blobcache:blobcache:decompress-thread')

/** Compressed bytes given to the thread and not yet taken by the inflater, per layer, before `write` waits. */
const SLACK = 4 << 20

// The worker's code (a CommonJS script). Messages in: [id, path] starts a job that gunzips into
// a new file at path (mode 0644), [id, buffer, length] feeds it the first length bytes of the
// (transferred) ArrayBuffer, which comes back as [id, buffer] once the inflater has taken the
// bytes, [id, true] ends the input, [id, false]
// aborts. Each job ends with one answer: [id, hex sha256, bytes] when its file is written,
// [id, null, message, code] when it failed, [id, null] when it was aborted; its file is removed
// before any but the first. Messages of one id are handled in order.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createHash } = require('node:crypto')
const { close: fsClose, constants: fsc, createWriteStream, fstatSync, ftruncate, openSync, statfsSync, unlink, write: fsWrite } = require('node:fs')
const { Transform, Writable, pipeline } = require('node:stream')
const { createInflateRaw } = require('node:zlib')
const CHUNK = 1 << 20
const jobs = new Map()

// The file is written as DirectWriter (src/io/direct-write.ts) writes: staged in page-aligned
// memory, with O_DIRECT through a second descriptor of the open file, the tail padded and the
// size set by ftruncate; a failed direct write goes again, and every later one goes, through
// the plain descriptor. Where that cannot be had, a plain write stream.
const REMOTE = new Set([${REMOTE_FILE_SYSTEM_TYPES.join(', ')}])
const remoteDevices = new Map()
function onRemote(fd) {
  try {
    const { dev } = fstatSync(fd)
    if (!remoteDevices.has(dev)) remoteDevices.set(dev, REMOTE.has(statfsSync('/proc/self/fd/' + fd).type))
    return remoteDevices.get(dev)
  } catch {
    return false
  }
}
const ALIGN = 4096
const freeStages = []
function newStage() {
  if (freeStages.length) return freeStages.pop()
  const memory = new WebAssembly.Memory({ initial: (CHUNK * 4) / 65536 })
  for (let i = 1; i < 4; i++) freeStages.push(Buffer.from(memory.buffer, i * CHUNK, CHUNK))
  return Buffer.from(memory.buffer, 0, CHUNK)
}
function fileSink(fd) {
  let direct = -1
  let stages
  if (process.env.BLOBCACHE_DIRECT_IO !== '0' && typeof WebAssembly === 'object' && fsc.O_DIRECT && !onRemote(fd)) {
    try {
      stages = [newStage(), newStage()]
      direct = openSync('/proc/self/fd/' + fd, fsc.O_WRONLY | fsc.O_DIRECT)
    } catch {
      if (stages) freeStages.push(...stages)
    }
  }
  if (direct < 0) {
    if (process.env.BLOBCACHE_DIRECT_IO === '1') throw Object.assign(new Error('no direct writes (BLOBCACHE_DIRECT_IO=1 asks for them)'), { code: 'ENOTSUP' })
    return createWriteStream(null, { fd, highWaterMark: CHUNK })
  }
  let filled = 0, pos = 0, inFlight = false, waiter = null, failed = null
  const put = (buf, len, at, done) => {
    const via = direct >= 0 ? direct : fd
    fsWrite(via, buf, 0, len, at, (err, n) => {
      if ((err || n < len) && via === direct) {
        fsClose(direct, () => {})
        direct = -1
        if (err) return put(buf, len, at, done)
      }
      if (err) return done(err)
      if (n < len) return put(buf.subarray(n), len - n, at + n, done)
      done(null)
    })
  }
  // stages[0] fills while stages[1] is written
  const issue = () => {
    const full = stages[0], len = filled, at = pos
    stages = [stages[1], full]
    pos += len; filled = 0; inFlight = true
    put(full, len, at, (err) => {
      inFlight = false
      if (err) failed = err
      const then = waiter
      waiter = null
      if (then) then()
    })
  }
  const whenIdle = (then) => { if (inFlight) waiter = then; else then() }
  return new Writable({
    highWaterMark: CHUNK,
    write(chunk, _e, cb) {
      let offset = 0
      const step = () => {
        for (;;) {
          if (failed) return cb(failed)
          if (filled === CHUNK) {
            if (inFlight) return (waiter = step)
            issue()
          }
          if (offset === chunk.length) return cb()
          const n = chunk.copy(stages[0], filled, offset)
          filled += n
          offset += n
        }
      }
      step()
    },
    final(cb) {
      whenIdle(() => {
        if (failed) return cb(failed)
        if (filled === 0) return cb()
        const len = filled, at = pos
        const padded = direct >= 0 ? Math.ceil(len / ALIGN) * ALIGN : len
        stages[0].fill(0, len, padded)
        put(stages[0], padded, at, (err) => (err ? cb(err) : ftruncate(fd, at + len, cb)))
      })
    },
    destroy(err, cb) {
      whenIdle(() => {
        freeStages.push(...stages)
        if (direct >= 0) fsClose(direct, () => {})
        fsClose(fd, () => cb(err))
      })
    },
  })
}
// Gunzip as createGunzip reads it (RFC 1952 members one after another, headers with any of
// FEXTRA, FNAME, FCOMMENT and FHCRC, zero bytes after a member taken as padding and the rest
// after them ignored), but with zlib's raw inflate, so without the crc32 of every output byte:
// about 8% of a cold blob-cache copy's CPU. The bytes are those of a blob whose sha256 is
// checked, and the output is named by its own sha256; each member's ISIZE is still checked.
const HEADER = 0, BODY = 1, TRAILER = 2, NEXT = 3, PADDING = 4
function zlibError(message, code) {
  return Object.assign(new Error(message), { code })
}
// Reads header bytes from buf at i; returns where the member's deflate data starts, or -1 when
// buf ends first (h keeps the place).
function readHeader(h, buf, i) {
  for (;;) {
    if (h.seen === 10 && (h.flags & 0x1e) === 0) return i
    if (i >= buf.length) return -1
    if (h.seen < 10) {
      const b = buf[i++]
      if ((h.seen === 0 && b !== 0x1f) || (h.seen === 1 && b !== 0x8b)) throw zlibError('incorrect header check', 'Z_DATA_ERROR')
      if (h.seen === 2 && b !== 8) throw zlibError('unknown compression method', 'Z_DATA_ERROR')
      if (h.seen === 3) {
        if (b & 0xe0) throw zlibError('unknown header flags set', 'Z_DATA_ERROR')
        h.flags = b
      }
      h.seen++
    } else if (h.flags & 4) {
      // FEXTRA: a 2-byte length, then that many bytes
      if (h.lengthBytes < 2) h.extra |= buf[i++] << (8 * h.lengthBytes++)
      else {
        const n = Math.min(h.extra, buf.length - i)
        i += n
        h.extra -= n
        if (h.extra === 0) h.flags &= ~4
      }
    } else if (h.flags & 24) {
      // FNAME, then FCOMMENT: zero-terminated
      const zero = buf.indexOf(0, i)
      if (zero < 0) i = buf.length
      else {
        i = zero + 1
        h.flags &= h.flags & 8 ? ~8 : ~16
      }
    } else {
      // FHCRC: two bytes
      i++
      if (++h.crcBytes === 2) h.flags &= ~2
    }
  }
}
class RawGunzip extends Transform {
  constructor() {
    super({ readableHighWaterMark: CHUNK })
    this.state = HEADER
    this.header = { seen: 0, flags: 0, lengthBytes: 0, extra: 0, crcBytes: 0 }
    this.trailer = Buffer.alloc(8)
    this.trailerBytes = 0
    this.inflater = null
    this.out = 0
  }
  _transform(chunk, _encoding, cb) {
    try {
      this.feed(chunk, 0, cb)
    } catch (err) {
      cb(err)
    }
  }
  feed(buf, i, cb) {
    for (;;) {
      if (this.state === PADDING || i >= buf.length) return cb()
      if (this.state === HEADER) {
        const at = readHeader(this.header, buf, i)
        if (at < 0) return cb()
        i = at
        this.startMember()
      } else if (this.state === BODY) {
        const part = i === 0 ? buf : buf.subarray(i)
        const inflater = this.inflater
        const before = inflater.bytesWritten
        return inflater.write(part, (err) => {
          if (err || this.destroyed) return
          const used = inflater.bytesWritten - before
          // all taken: the deflate data goes on (or ends just here, and the next write takes nothing)
          if (used === part.length) return cb()
          // it ended inside part: what is left is the trailer and what follows the member
          this.state = TRAILER
          this.afterInflater(() => {
            try {
              this.feed(buf, i + used, cb)
            } catch (e) {
              cb(e)
            }
          })
        })
      } else if (this.state === TRAILER) {
        const n = Math.min(8 - this.trailerBytes, buf.length - i)
        this.trailer.set(buf.subarray(i, i + n), this.trailerBytes)
        this.trailerBytes += n
        i += n
        if (this.trailerBytes === 8) {
          if (this.trailer.readUInt32LE(4) !== this.out % 4294967296) throw zlibError('incorrect length check', 'Z_DATA_ERROR')
          this.state = NEXT
        }
      } else {
        // after a member: another one, or zero bytes of padding
        if (buf[i] === 0) this.state = PADDING
        else {
          this.state = HEADER
          this.header = { seen: 0, flags: 0, lengthBytes: 0, extra: 0, crcBytes: 0 }
          this.trailerBytes = 0
          this.out = 0
        }
      }
    }
  }
  startMember() {
    this.state = BODY
    const inflater = createInflateRaw({ chunkSize: CHUNK })
    this.inflater = inflater
    inflater.on('data', (data) => {
      this.out += data.length
      if (!this.push(data)) inflater.pause()
    })
    inflater.on('error', (err) => this.destroy(err))
  }
  // calls then once the member's inflater, which has come to the end of its deflate data, has
  // given all its output
  afterInflater(then) {
    const inflater = this.inflater
    const ended = () => {
      this.inflater = null
      inflater.destroy()
      then()
    }
    // 'end' may have been emitted before the write's callback
    if (inflater.readableEnded) ended()
    else inflater.once('end', ended)
  }
  _read(size) {
    if (this.inflater) this.inflater.resume()
    super._read(size)
  }
  _flush(cb) {
    if (this.state === NEXT || this.state === PADDING) return cb()
    cb(zlibError('unexpected end of file', 'Z_BUF_ERROR'))
  }
  _destroy(err, cb) {
    if (this.inflater) this.inflater.destroy()
    cb(err)
  }
}
function start(id, path) {
  // created here, before the pipeline: a stream opening its file in the background could
  // create it after a failure had already removed it
  let fd
  try {
    fd = openSync(path, 'wx', 0o644)
  } catch (err) {
    return parentPort.postMessage([id, null, String(err.message || err), err.code])
  }
  let out
  try {
    out = fileSink(fd)
  } catch (err) {
    fsClose(fd, () => {})
    return unlink(path, () => parentPort.postMessage([id, null, String(err.message || err), err.code]))
  }
  const hash = createHash('sha256')
  let bytes = 0
  const gunzip = new RawGunzip()
  const hasher = new Transform({ highWaterMark: CHUNK, transform(chunk, _e, cb) { hash.update(chunk); bytes += chunk.length; cb(null, chunk) } })
  const job = { gunzip, aborted: false }
  jobs.set(id, job)
  pipeline(gunzip, hasher, out, (err) => {
    jobs.delete(id)
    if (!err) return parentPort.postMessage([id, hash.digest('hex'), bytes])
    unlink(path, () => parentPort.postMessage(job.aborted ? [id, null] : [id, null, String(err.message || err), err.code]))
  })
}
parentPort.on('message', (m) => {
  const id = m[0]
  if (typeof m[1] === 'string') return start(id, m[1])
  const job = jobs.get(id)
  if (m.length === 3) {
    const back = () => parentPort.postMessage([id, m[1]], [m[1]])
    if (!job || job.gunzip.destroyed) return back()
    job.gunzip.write(new Uint8Array(m[1], 0, m[2]), back)
  } else if (job && m[1]) job.gunzip.end()
  else if (job) {
    job.aborted = true
    job.gunzip.destroy(new Error('aborted'))
  }
})
`

type Answer = [number, ArrayBuffer] | [number, string, number] | [number, null, string?, string?]

interface Job {
  /** Called for each piece taken, with its buffer back. */
  taken(buffer: ArrayBuffer): void
  /** Called once, with the job's last answer (or the thread's failure). */
  finish(answer: { hex: string; bytes: number } | { err: Error } | undefined): void
}

/**
 * The process's decompression thread, started on first use; it does not keep the process
 * alive when idle. If it fails, every job it holds fails (reported, so counted as cache
 * errors), and later layers are decompressed on the main thread.
 */
class DecompressThread {
  readonly #worker: Worker
  readonly #jobs = new Map<number, Job>()
  #next = 1
  #dead: Error | undefined

  constructor() {
    this.#worker = startScriptWorker<Answer>(WORKER_SOURCE, 'blobcache decompression', (m) => this.#answer(m), (err) => this.#die(err))
  }

  get dead(): boolean {
    return this.#dead !== undefined
  }

  /** Starts a job writing `path`; returns its id. */
  start(path: string, job: Job): number {
    const id = this.#next++
    if (this.#jobs.size === 0) this.#worker.ref()
    this.#jobs.set(id, job)
    this.#worker.postMessage([id, path])
    return id
  }

  post(message: unknown[], transfer?: ArrayBuffer[]): void {
    if (!this.#dead) this.#worker.postMessage(message, transfer)
  }

  #answer(m: Answer): void {
    const job = this.#jobs.get(m[0])
    if (!job) return
    if (m[1] instanceof ArrayBuffer) return job.taken(m[1])
    this.#jobs.delete(m[0])
    if (this.#jobs.size === 0) this.#worker.unref()
    if (typeof m[1] === 'string') job.finish({ hex: m[1], bytes: m[2] as number })
    else if (m.length === 2) job.finish(undefined)
    else job.finish({ err: Object.assign(new Error(m[2] as string), m[3] ? { code: m[3] } : {}) })
  }

  #die(err: Error): void {
    if (this.#dead) return
    this.#dead = err
    threadFailed = true
    log('decompression thread failed: %s', err.message)
    if (thread === this) thread = undefined
    const jobs = [...this.#jobs.values()]
    this.#jobs.clear()
    for (const job of jobs) job.finish({ err })
  }
}

let thread: DecompressThread | undefined
/** A thread has failed: later layers are decompressed on the main thread. */
let threadFailed = false

/**
 * A gzip decompression on the decompression thread, or undefined when a thread failed before
 * (then the caller decompresses on its own thread).
 */
export function threadDecompression(dir: string, base: string, onError: CacheErrorHandler): Decompression | undefined {
  if (threadFailed) return undefined
  try {
    return new ThreadDecompression(dir, base, onError)
  } catch (err) {
    threadFailed = true
    log('no decompression thread: %s', (err as Error).message)
    return undefined
  }
}

/** Bytes of a piece: one 1 MiB read and one 64 KiB read more fit. */
export const PIECE_BYTES = (1 << 20) + (64 << 10)
/** Free pieces kept for reuse (17 MiB), while some decompression runs. */
const PIECES_KEPT = 16
const freePieces: ArrayBuffer[] = []
let running = 0

function newPiece(): ArrayBuffer {
  return freePieces.pop() ?? new ArrayBuffer(PIECE_BYTES)
}

function givePieceBack(piece: ArrayBuffer): void {
  if (running > 0 && freePieces.length < PIECES_KEPT && piece.byteLength === PIECE_BYTES) freePieces.push(piece)
}

/**
 * A gzip {@link Decompression} on the decompression thread. The bytes given are copied into
 * pieces that are transferred to the thread, which sends each back once the inflater has taken
 * it; `write` waits while more than {@link SLACK} bytes are with the thread, and the inflater in
 * turn waits for the file, so memory stays bounded.
 */
class ThreadDecompression implements Decompression {
  readonly algorithm = 'gzip' as const
  readonly done: Promise<DerivedFile | undefined>
  readonly #thread: DecompressThread
  readonly #id: number
  #piece: { buffer: ArrayBuffer; bytes: Buffer; filled: number } | undefined
  /** Pieces with the thread. */
  #given = 0
  #waiting: (() => void) | undefined
  #over = false
  #aborted = false

  constructor(dir: string, base: string, onError: CacheErrorHandler) {
    const tmp = tempPath(dir, base)
    if (!thread || thread.dead) thread = new DecompressThread()
    this.#thread = thread
    let finish!: (file: DerivedFile | undefined) => void
    this.done = new Promise((resolve) => (finish = resolve))
    running++
    this.#id = this.#thread.start(tmp, {
      taken: (buffer) => this.#taken(buffer),
      finish: (answer) => {
        this.#over = true
        this.#piece = undefined
        if (--running === 0) freePieces.length = 0
        this.#wake()
        if (answer && 'hex' in answer) {
          finish({ tmp, digest: `sha256:${answer.hex}` as Digest })
          return
        }
        if (answer && !this.#aborted) onError(`decompressing ${base} (gzip)`, answer.err)
        // the thread removed it already, unless it died
        removeQuietly(tmp).then(() => finish(undefined))
      },
    })
  }

  /** Copies `chunk` into pieces, giving each full one to the thread. */
  async write(chunk: Buffer): Promise<void> {
    let offset = 0
    while (offset < chunk.length && !this.#over) {
      if (!this.#piece) {
        const buffer = newPiece()
        this.#piece = { buffer, bytes: Buffer.from(buffer), filled: 0 }
      }
      const piece = this.#piece
      const n = chunk.copy(piece.bytes, piece.filled, offset)
      piece.filled += n
      offset += n
      if (piece.filled === PIECE_BYTES) this.#give()
    }
    while (!this.#over && this.#given * PIECE_BYTES > SLACK) await new Promise<void>((resolve) => (this.#waiting = resolve))
  }

  /** Gives the rest to the thread and ends the input. */
  end(): void {
    if (this.#over) return
    this.#give()
    this.#thread.post([this.#id, true])
  }

  /** Stops the job; {@link done} resolves undefined once its file is gone. */
  abort(): void {
    if (this.#over || this.#aborted) return
    this.#aborted = true
    this.#thread.post([this.#id, false])
  }

  #give(): void {
    const piece = this.#piece
    this.#piece = undefined
    if (!piece || piece.filled === 0) {
      if (piece) givePieceBack(piece.buffer)
      return
    }
    this.#given++
    this.#thread.post([this.#id, piece.buffer, piece.filled], [piece.buffer])
  }

  #taken(buffer: ArrayBuffer): void {
    this.#given--
    givePieceBack(buffer)
    this.#wake()
  }

  #wake(): void {
    const waiting = this.#waiting
    this.#waiting = undefined
    waiting?.()
  }
}
