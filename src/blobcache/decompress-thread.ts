// Decompressing gzip layers on threads of their own. The cache stores the decompressed form of
// every gzip layer it sees; on the main thread that cost a cold copy of 4 x 41 MiB layers about
// 550 ms of main-thread time (sha256 of 256 MiB, zlib's callbacks, 256 writes and their garbage)
// while the main thread also had to read and write the layers. Here the main thread only copies
// the compressed bytes into pieces; a worker thread (one per core at most, as layers come)
// inflates them on itself, straight into the page-aligned memory the file is written from,
// hashes that and writes the `.tmp-` file. The pieces are plain ArrayBuffers transferred to the
// thread and back, and reused: V8 copies into shared memory several times slower than into a
// plain buffer (61 ms against about 10 ms of main thread for 164 MiB). Inflating through zlib's
// stream instead (on libuv's pool, into a new 1 MiB buffer per output chunk, copied again into
// the file's memory) cost a cold copy 0.1 s more CPU and 15 000 more page faults.
import { availableParallelism } from 'node:os'
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
const { close: fsClose, constants: fsc, fstatSync, ftruncate, openSync, statfsSync, unlink, write: fsWrite } = require('node:fs')
const { createInflateRaw, constants: { Z_NO_FLUSH } } = require('node:zlib')
const CHUNK = 1 << 20
const jobs = new Map()

// The file is written as DirectWriter (src/io/direct-write.ts) writes: staged in page-aligned
// memory, with O_DIRECT through a second descriptor of the open file, the tail padded and the
// size set by ftruncate; a failed direct write goes again, and every later one goes, through
// the plain descriptor. Where O_DIRECT cannot be had, every write goes through it from the start.
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
// The decompressed file and its sha256. The inflater writes straight into stages[0] (room()
// bytes from filled on), which is hashed as it fills and, once full, written while stages[1]
// fills: no other buffer is made or copied. With O_DIRECT, as said above, where it can be had;
// else through the plain descriptor from the same stages.
class Output {
  constructor(fd) {
    this.fd = fd
    this.direct = -1
    if (process.env.BLOBCACHE_DIRECT_IO !== '0' && fsc.O_DIRECT && !onRemote(fd)) {
      try {
        this.direct = openSync('/proc/self/fd/' + fd, fsc.O_WRONLY | fsc.O_DIRECT)
      } catch {}
    }
    if (this.direct < 0 && process.env.BLOBCACHE_DIRECT_IO === '1') {
      throw Object.assign(new Error('no direct writes (BLOBCACHE_DIRECT_IO=1 asks for them)'), { code: 'ENOTSUP' })
    }
    this.stages = [newStage(), newStage()]
    this.filled = 0
    this.pos = 0
    this.inFlight = false
    this.waiter = null
    this.failed = null
    this.hash = createHash('sha256')
    this.bytes = 0
  }
  // bytes free in stages[0] (a full one is handed to the disk first); 0 while both are busy
  room() {
    if (this.filled === CHUNK) {
      if (this.inFlight) return 0
      this.issue()
    }
    return CHUNK - this.filled
  }
  took(n) {
    if (n === 0) return
    this.hash.update(this.stages[0].subarray(this.filled, this.filled + n))
    this.filled += n
    this.bytes += n
  }
  put(buf, len, at, done) {
    const via = this.direct >= 0 ? this.direct : this.fd
    fsWrite(via, buf, 0, len, at, (err, n) => {
      if ((err || n < len) && via === this.direct) {
        fsClose(this.direct, () => {})
        this.direct = -1
        if (err) return this.put(buf, len, at, done)
      }
      if (err) return done(err)
      if (n < len) return this.put(buf.subarray(n), len - n, at + n, done)
      done(null)
    })
  }
  issue() {
    const full = this.stages[0], len = this.filled, at = this.pos
    this.stages = [this.stages[1], full]
    this.pos += len
    this.filled = 0
    this.inFlight = true
    this.put(full, len, at, (err) => {
      this.inFlight = false
      if (err) this.failed = err
      const then = this.waiter
      this.waiter = null
      if (then) then()
    })
  }
  // after the write in flight, and after whatever already waits for it
  whenIdle(then) {
    if (!this.inFlight) return then()
    const before = this.waiter
    this.waiter = before ? () => (before(), then()) : then
  }
  // writes what is left (padded for O_DIRECT), then sets the size
  finish(cb) {
    this.whenIdle(() => {
      if (this.failed) return cb(this.failed)
      const len = this.filled, at = this.pos
      if (len === 0) return cb(null)
      const padded = this.direct >= 0 ? Math.ceil(len / ALIGN) * ALIGN : len
      this.stages[0].fill(0, len, padded)
      this.put(this.stages[0], padded, at, (err) => (err ? cb(err) : ftruncate(this.fd, at + len, cb)))
    })
  }
  close(cb) {
    this.whenIdle(() => {
      freeStages.push(...this.stages)
      this.stages = null
      if (this.direct >= 0) fsClose(this.direct, () => {})
      fsClose(this.fd, () => cb())
    })
  }
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
// Where readHeader is in a member's header (it starts a member).
function newHeader() {
  return { seen: 0, flags: 0, lengthBytes: 0, extra: 0, crcBytes: 0 }
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
// One decompression: gzip members parsed here (readHeader, then the trailer), the deflate data
// given to a raw inflater's handle synchronously (its writeSync, as zlib's own *Sync functions
// use it), which inflates straight into the Output's stage. Pieces are handled in the order
// they came; each goes back to the main thread (back) once all its bytes are taken.
class Job {
  constructor(id, path, out) {
    this.id = id
    this.path = path
    this.out = out
    this.state = HEADER
    this.header = newHeader()
    this.trailer = Buffer.alloc(8)
    this.trailerBytes = 0
    this.inflater = null
    this.memberBytes = 0
    this.queue = []
    this.busy = false
    this.over = false
    this.aborted = false
  }
  push(action) {
    this.queue.push(action)
    if (!this.busy) this.next()
  }
  next() {
    this.busy = false
    while (!this.busy && this.queue.length) {
      const action = this.queue.shift()
      this.busy = true
      action()
    }
  }
  feed(buf, back) {
    if (this.over) {
      back()
      return this.next()
    }
    this.run(buf, 0, back)
  }
  run(buf, i, back) {
    try {
      for (;;) {
        if (this.over) break
        if (this.out.failed) throw this.out.failed
        if (this.state === PADDING || i >= buf.length) break
        if (this.state === HEADER) {
          const at = readHeader(this.header, buf, i)
          if (at < 0) break
          i = at
          this.state = BODY
          this.memberBytes = 0
          this.inflater = createInflateRaw()
          this.inflater.on('error', () => {})
        } else if (this.state === BODY) {
          const room = this.out.room()
          if (room === 0) {
            this.out.waiter = () => this.run(buf, i, back)
            return
          }
          const inflater = this.inflater
          const state = inflater._writeState
          const given = buf.length - i
          inflater._handle.writeSync(Z_NO_FLUSH, buf, i, given, this.out.stages[0], this.out.filled, room)
          if (inflater.errored) throw inflater.errored
          const made = room - state[0]
          i += given - state[1]
          this.out.took(made)
          this.memberBytes += made
          // room and bytes left, yet it stopped: the member's deflate data has ended
          if (state[0] > 0 && state[1] > 0) {
            inflater.close()
            this.inflater = null
            this.state = TRAILER
          }
        } else if (this.state === TRAILER) {
          const n = Math.min(8 - this.trailerBytes, buf.length - i)
          this.trailer.set(buf.subarray(i, i + n), this.trailerBytes)
          this.trailerBytes += n
          i += n
          if (this.trailerBytes === 8) {
            if (this.trailer.readUInt32LE(4) !== this.memberBytes % 4294967296) throw zlibError('incorrect length check', 'Z_DATA_ERROR')
            this.state = NEXT
          }
        } else if (buf[i] === 0) {
          // after a member: zero bytes of padding (the rest is ignored), or another member
          this.state = PADDING
        } else {
          this.state = HEADER
          this.header = newHeader()
          this.trailerBytes = 0
        }
      }
    } catch (err) {
      this.fail(err)
    }
    back()
    this.next()
  }
  end() {
    if (this.over) return
    if (this.state !== NEXT && this.state !== PADDING) return this.fail(zlibError('unexpected end of file', 'Z_BUF_ERROR'))
    this.over = true
    this.out.finish((err) => {
      if (err) {
        this.over = false
        return this.fail(err)
      }
      this.out.close(() => {
        // an abort while the file was being finished still removes it
        if (this.aborted) return unlink(this.path, () => this.answer([this.id, null]))
        this.answer([this.id, this.out.hash.digest('hex'), this.out.bytes])
      })
    })
  }
  abort() {
    this.aborted = true
    this.fail(new Error('aborted'))
  }
  // ends the job once: its file closed and removed, then the answer
  fail(err) {
    if (this.over) return
    this.over = true
    if (this.inflater) this.inflater.close()
    this.inflater = null
    this.out.close(() => unlink(this.path, () => this.answer(this.aborted ? [this.id, null] : [this.id, null, String(err.message || err), err.code])))
  }
  answer(message) {
    jobs.delete(this.id)
    parentPort.postMessage(message)
  }
}
function start(id, path) {
  let fd
  try {
    fd = openSync(path, 'wx', 0o644)
  } catch (err) {
    return parentPort.postMessage([id, null, String(err.message || err), err.code])
  }
  let out
  try {
    out = new Output(fd)
  } catch (err) {
    fsClose(fd, () => {})
    return unlink(path, () => parentPort.postMessage([id, null, String(err.message || err), err.code]))
  }
  jobs.set(id, new Job(id, path, out))
}
parentPort.on('message', (m) => {
  const id = m[0]
  if (typeof m[1] === 'string') return start(id, m[1])
  const job = jobs.get(id)
  if (m.length === 3) {
    const back = () => parentPort.postMessage([id, m[1]], [m[1]])
    if (!job) return back()
    job.push(() => job.feed(new Uint8Array(m[1], 0, m[2]), back))
  } else if (job && m[1]) job.push(() => job.end())
  else if (job) job.abort()
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
 * One of the process's decompression threads; it does not keep the process alive when idle. It
 * takes the pieces of its jobs in the order they come. If it fails, every job it holds fails
 * (reported, so counted as cache errors), and later layers are decompressed on the main thread.
 */
class DecompressThread {
  readonly #worker: Worker
  readonly #jobs = new Map<number, Job>()
  #next = 1
  #dead: Error | undefined

  constructor() {
    this.#worker = startScriptWorker<Answer>(WORKER_SOURCE, 'blobcache decompression', (m) => this.#answer(m), (err) => this.#die(err))
  }

  /** Jobs it holds now. */
  get load(): number {
    return this.#jobs.size
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
    const at = threads.indexOf(this)
    if (at >= 0) threads.splice(at, 1)
    const jobs = [...this.#jobs.values()]
    this.#jobs.clear()
    for (const job of jobs) job.finish({ err })
  }
}

/** The decompression threads: at most one per core (4 at most), started as layers come. */
const threads: DecompressThread[] = []
const MAX_THREADS = Math.max(1, Math.min(4, availableParallelism()))

/** The least busy thread, or a new one while a layer would otherwise wait. */
function pickThread(): DecompressThread {
  let best = threads[0]
  for (const t of threads) if (t.load < best.load) best = t
  if (best && (best.load === 0 || threads.length >= MAX_THREADS)) return best
  const started = new DecompressThread()
  threads.push(started)
  return started
}
/** How many decompression threads run now (for tests). */
export function decompressionThreads(): number {
  return threads.length
}

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
    this.#thread = pickThread()
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
