// Decompressing gzip and zstd layers on threads of their own. The cache stores the decompressed
// form of every compressed layer it sees; on the main thread that cost a cold copy of 4 x 41 MiB
// layers about 550 ms of main-thread time (sha256 of 256 MiB, zlib's callbacks, 256 writes and their garbage)
// while the main thread also had to read and write the layers. Here the main thread only copies
// the compressed bytes into pieces; a worker thread (one per core at most, as layers come)
// inflates them on itself, straight into the page-aligned memory the file is written from,
// hashes that and writes the `.tmp-` file. The pieces are plain ArrayBuffers transferred to the
// thread and back, and reused: V8 copies into shared memory several times slower than into a
// plain buffer (61 ms against about 10 ms of main thread for 164 MiB). Inflating through zlib's
// stream instead (on libuv's pool, into a new 1 MiB buffer per output chunk, copied again into
// the file's memory) cost a cold copy 0.1 s more CPU and 15 000 more page faults. zstd layers
// go the same way, through zstd-napi's decompression context loaded on the thread.
//
// When the blob is a local file (a layout's blob copied into a cache whose destination takes
// files, see local-file.ts), the thread also reads it itself (copyFileOnThread): straight into
// the page-aligned memory the cache's copy is written from, hashed there, and inflated from
// there, so the main thread neither reads, hashes, copies nor writes any of it. Alternated with
// the build before, 15 runs each, that took a cold oci -> dir copy through the cache from 0.99
// to 0.81 s of CPU, from 37 000 to 16 000 page faults and from 0.62 to 0.54 s.
import { availableParallelism } from 'node:os'
import type { Worker } from 'node:worker_threads'
import debug from 'debug'
import type { Digest, DigestAlgorithm } from '../digest.js'
import { REMOTE_FILE_SYSTEM_TYPES } from '../io/direct-write.js'
import { type StoppableThread, idleChanged, startScriptWorker, trackThread } from '../io/script-worker.js'
import { resolveLazily } from '../lazy-require.js'
import { removeQuietly, tempPath } from './files.js'
import type { CacheErrorHandler, Decompression, DerivedFile } from './variants.js'

const log = debug('blobcache:blobcache:decompress-thread')

/** Compressed bytes given to the thread and not yet taken by the inflater, per layer, before `write` waits. */
const SLACK = 4 << 20

// The worker's code (a CommonJS script). Messages in: [id, path, algorithm, binding] starts a job
// that decompresses gzip, or zstd with zstd-napi's binding at that path, into a new file at path
// (mode 0644), [id, buffer, length] feeds it the first length bytes of the
// (transferred) ArrayBuffer, which comes back as [id, buffer] once the inflater has taken the
// bytes, [id, true] ends the input, [id, false] aborts. Each job ends with one answer: [id, hex
// sha256, bytes] when its file is written, [id, null, message, code] when it failed, [id, null]
// when it was aborted; its file is removed before any but the first. [id, spec] (a
// FileCopySpec) starts a file job, which reads its input itself, tells [id, bytes read] now and
// then, can be aborted the same way, and ends with [id, { hex, bytes, out }], or [id, null,
// message, code, side] (see FileJob). Messages of one id are handled in order.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createHash } = require('node:crypto')
const { close: fsClose, constants: fsc, fstatSync, ftruncate, openSync, readSync, statfsSync, unlink, write: fsWrite } = require('node:fs')
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
  constructor(fd, algorithm = 'sha256', mayDirect = true) {
    this.fd = fd
    this.direct = -1
    if (mayDirect && process.env.BLOBCACHE_DIRECT_IO !== '0' && fsc.O_DIRECT && !onRemote(fd)) {
      try {
        this.direct = openSync('/proc/self/fd/' + fd, fsc.O_WRONLY | fsc.O_DIRECT)
      } catch {}
    }
    if (mayDirect && this.direct < 0 && process.env.BLOBCACHE_DIRECT_IO === '1') {
      throw Object.assign(new Error('no direct writes (BLOBCACHE_DIRECT_IO=1 asks for them)'), { code: 'ENOTSUP' })
    }
    this.stages = [newStage(), newStage()]
    this.filled = 0
    this.pos = 0
    this.inFlight = false
    this.waiter = null
    this.failed = null
    this.hash = createHash(algorithm)
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
  constructor(id, path, out, reply = (message) => parentPort.postMessage(message)) {
    this.id = id
    this.reply = reply
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
  // decodes buf from i on; back() once all of it is taken (or the job is over)
  run(buf, i, back) {
    try {
      if (!this.decode(buf, i, back)) return
    } catch (err) {
      this.fail(err)
    }
    back()
    this.next()
  }
  // false when it stopped for room in the output, and will run again once there is
  decode(buf, i, back) {
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
          return false
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
    return true
  }
  end() {
    if (this.over) return
    if (this.state !== NEXT && this.state !== PADDING) return this.fail(zlibError('unexpected end of file', 'Z_BUF_ERROR'))
    this.finishFile()
  }
  // the input is over and whole: the file is written to its end and closed, then the answer
  finishFile() {
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
    this.reply(message)
  }
}
// zstd, through zstd-napi's DCtx (the main thread gives the path of its binding), driven as Job
// drives the inflater: decompressStream writes straight into the Output's stage. Frames follow
// one another (zstd itself skips skippable ones, as zstd:chunked has), and the input must end
// where a frame does.
const EMPTY = Buffer.alloc(0)
let zstdBinding = null
class ZstdJob extends Job {
  constructor(id, path, out, binding, reply) {
    super(id, path, out, reply)
    zstdBinding = zstdBinding || require(binding)
    this.dctx = new zstdBinding.DCtx()
    // in a frame (or holding output) after the last call; the output was full then
    this.midFrame = false
    this.full = false
  }
  decode(buf, i, back) {
    while (!this.over && (i < buf.length || this.full)) {
      if (this.out.failed) throw this.out.failed
      const room = this.out.room()
      if (room === 0) {
        this.out.waiter = () => this.run(buf, i, back)
        return false
      }
      const at = this.out.filled
      const [ret, produced, consumed] = this.dctx.decompressStream(this.out.stages[0].subarray(at, at + room), buf.subarray(i))
      this.out.took(produced)
      i += consumed
      this.midFrame = ret !== 0
      this.full = produced === room
    }
    return true
  }
  end() {
    if (this.over) return
    // what zstd still holds goes out first
    this.run(EMPTY, 0, () => {
      if (this.over) return
      if (this.midFrame) return this.fail(zlibError('unexpected end of file', 'Z_BUF_ERROR'))
      this.finishFile()
    })
  }
}
// A blob the thread reads from a local file itself (a layout's blob): read straight into the
// page-aligned stages of its copy, the cache's .tmp- file (hashed there with the blob's
// algorithm, and written with O_DIRECT unless told not to), and from the same memory given to
// a Job (a ZstdJob for zstd) decompressing it into the decompressed file when it is a layer. The
// main thread touches none of the bytes. A failure of the source or of the copy ends it ([id, null, message,
// code, side], side 'source' or 'cache', nothing left); one of the decompression only loses
// the decompressed file. It ends with [id, { hex, bytes, out }], out being the Job's answer.
// Progress: [id, bytes read] every PROGRESS bytes.
const PROGRESS = 4 << 20
class FileJob {
  constructor(id, spec) {
    this.id = id
    this.spec = spec
    this.src = -1
    this.copy = null
    this.inflate = null
    this.inflated = null
    this.copied = null
    this.pos = 0
    this.reported = 0
    this.over = false
    this.aborted = false
    this.finishing = false
    this.removed = null
  }
  start() {
    const { source, copy, algorithm, direct, out, decompress, zstd } = this.spec
    try {
      this.src = openSync(source, fsc.O_RDONLY)
      if (!fstatSync(this.src).isFile()) throw zlibError(source + ': not a regular file', 'EINVAL')
    } catch (err) {
      return this.fail(err, 'source', false)
    }
    let fd = -1
    try {
      fd = openSync(copy, 'wx', 0o644)
      this.copy = new Output(fd, algorithm, direct)
    } catch (err) {
      if (fd >= 0) fsClose(fd, () => {})
      return this.fail(err, 'cache', fd >= 0)
    }
    if (out) {
      let ofd = -1
      try {
        ofd = openSync(out, 'wx', 0o644)
        const output = new Output(ofd)
        const reply = (m) => this.inflateDone(m)
        this.inflate = decompress === 'zstd' ? new ZstdJob(0, out, output, zstd, reply) : new Job(0, out, output, reply)
      } catch (err) {
        if (ofd >= 0) {
          fsClose(ofd, () => {})
          unlink(out, () => {})
        }
        this.inflated = [0, null, String(err.message || err), err.code]
      }
    }
    this.step()
  }
  // reads and hands on until the copy's stages are busy, the inflater waits for its file, or
  // the file ends
  step() {
    const { size } = this.spec
    try {
      for (;;) {
        if (this.over) return
        if (this.copy.failed) throw this.copy.failed
        const room = this.copy.room()
        if (room === 0) {
          this.copy.waiter = () => this.step()
          return
        }
        const stage = this.copy.stages[0]
        const at = this.copy.filled
        let n
        try {
          n = readSync(this.src, stage, at, size >= 0 ? Math.min(room, size + 1 - this.pos) : room, this.pos)
        } catch (err) {
          return this.fail(err, 'source')
        }
        if (n === 0) return this.eof()
        this.copy.took(n)
        this.pos += n
        if (size >= 0 && this.pos > size) return this.fail(zlibError('more than the expected ' + size + ' bytes', 'SIZE_INVALID'), 'source')
        if (this.pos - this.reported >= PROGRESS) {
          this.reported = this.pos
          parentPort.postMessage([this.id, this.pos])
        }
        if (!this.inflate) continue
        let sync = true
        let taken = false
        this.inflate.run(stage.subarray(at, at + n), 0, () => {
          if (sync) taken = true
          else this.step()
        })
        sync = false
        if (!taken) return
      }
    } catch (err) {
      this.fail(err, 'cache')
    }
  }
  eof() {
    const { size } = this.spec
    if (size >= 0 && this.pos !== size) return this.fail(zlibError('ended after ' + this.pos + ' of the expected ' + size + ' bytes', 'SIZE_INVALID'), 'source')
    fsClose(this.src, () => {})
    this.src = -1
    if (this.inflate) this.inflate.end()
    const copy = this.copy
    this.finishing = true
    copy.finish((err) => {
      this.finishing = false
      // a failure or an abort came meanwhile, and left the copy to be closed here
      if (this.over) return copy.close(this.removed)
      if (err) return this.fail(err, 'cache')
      this.copy = null
      const copied = { hex: copy.hash.digest('hex'), bytes: copy.bytes }
      copy.close(() => {
        this.copied = copied
        this.settle()
      })
    })
  }
  inflateDone(m) {
    this.inflate = null
    this.inflated = m
    this.settle()
  }
  settle() {
    if (this.over || !this.copied || this.inflate) return
    this.over = true
    jobs.delete(this.id)
    const m = this.inflated
    const out = !m ? null : typeof m[1] === 'string' ? { hex: m[1], bytes: m[2] } : { error: m.length > 2 ? m[2] : 'aborted', code: m[3] }
    parentPort.postMessage([this.id, { hex: this.copied.hex, bytes: this.copied.bytes, out }])
  }
  abort() {
    this.aborted = true
    this.fail(new Error('aborted'), 'abort')
  }
  // ends the job once: every file it made closed and removed, then the answer
  fail(err, side, made = true) {
    if (this.over) return
    this.over = true
    jobs.delete(this.id)
    if (this.src >= 0) fsClose(this.src, () => {})
    this.src = -1
    const inflate = this.inflate
    this.inflate = null
    if (inflate) {
      inflate.reply = () => {}
      inflate.abort()
    } else if (this.inflated && typeof this.inflated[1] === 'string') unlink(this.spec.out, () => {})
    const answer = () => parentPort.postMessage(this.aborted ? [this.id, null] : [this.id, null, String(err.message || err), err.code, side])
    const removed = () => (made ? unlink(this.spec.copy, answer) : answer())
    const copy = this.copy
    if (copy && this.finishing) {
      this.removed = removed
      return
    }
    this.copy = null
    if (copy) copy.close(removed)
    else removed()
  }
}
function start(id, path, algorithm, binding) {
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
  try {
    jobs.set(id, algorithm === 'zstd' ? new ZstdJob(id, path, out, binding) : new Job(id, path, out))
  } catch (err) {
    out.close(() => unlink(path, () => parentPort.postMessage([id, null, String(err.message || err), err.code])))
  }
}
parentPort.on('message', (m) => {
  const id = m[0]
  if (typeof m[1] === 'string') return start(id, m[1], m[2], m[3])
  if (m[1] !== null && typeof m[1] === 'object' && !(m[1] instanceof ArrayBuffer)) {
    const job = new FileJob(id, m[1])
    jobs.set(id, job)
    return job.start()
  }
  const job = jobs.get(id)
  if (m.length === 3) {
    const back = () => parentPort.postMessage([id, m[1]], [m[1]])
    if (!job) return back()
    job.push(() => job.feed(new Uint8Array(m[1], 0, m[2]), back))
  } else if (job && m[1]) job.push(() => job.end())
  else if (job) job.abort()
})
`

/** A file job's answer: the copy's hash and size, and the decompressed file's outcome. */
interface FileAnswer {
  hex: string
  bytes: number
  out: { hex: string; bytes: number } | { error: string; code?: string } | null
}

type Answer =
  | [number, ArrayBuffer]
  | [number, number]
  | [number, string, number]
  | [number, FileAnswer]
  | [number, null, string?, string?, ('source' | 'cache')?]

interface Job {
  /** Called for each piece taken, with its buffer back. */
  taken(buffer: ArrayBuffer): void
  /** A file job's bytes read so far. */
  progress?(bytes: number): void
  /** Called once, with the job's last answer (or the thread's failure). */
  finish(answer: { hex: string; bytes: number } | { file: FileAnswer } | { err: Error & { side?: string } } | undefined): void
}

/**
 * One of the process's decompression threads; it does not keep the process alive when idle. It
 * takes the pieces of its jobs in the order they come. If it fails, every job it holds fails
 * (reported, so counted as cache errors), and later layers are decompressed on the main thread.
 */
class DecompressThread implements StoppableThread {
  readonly #worker: Worker
  readonly #jobs = new Map<number, Job>()
  #next = 1
  #dead: Error | undefined

  constructor() {
    this.#worker = startScriptWorker<Answer>(WORKER_SOURCE, 'blobcache decompression', (m) => this.#answer(m), (err) => this.#die(err))
    trackThread(this)
  }

  get idle(): boolean {
    return this.#jobs.size === 0 && !this.#dead
  }

  /** Ends the thread on purpose (no job is failed, and later layers still get threads). */
  async stop(): Promise<void> {
    if (this.#dead) return
    this.#dead = new Error('the decompression thread was stopped')
    this.#forget()
    await this.#worker.terminate()
  }

  #forget(): void {
    trackThread(this, false)
    const at = threads.indexOf(this)
    if (at >= 0) threads.splice(at, 1)
  }

  /** Jobs it holds now. */
  get load(): number {
    return this.#jobs.size
  }

  get dead(): boolean {
    return this.#dead !== undefined
  }

  /**
   * Starts a job: decompressing pieces into a new file (its path, the algorithm and, for zstd,
   * the binding's path), or a file job (see FileCopySpec); returns its id.
   */
  start(what: [string, ThreadAlgorithm, string | undefined] | FileCopySpec, job: Job): number {
    const id = this.#next++
    this.#jobs.set(id, job)
    if (this.#jobs.size === 1) {
      this.#worker.ref()
      idleChanged(this)
    }
    this.#worker.postMessage(Array.isArray(what) ? [id, ...what] : [id, what])
    return id
  }

  post(message: unknown[], transfer?: ArrayBuffer[]): void {
    if (!this.#dead) this.#worker.postMessage(message, transfer)
  }

  #answer(m: Answer): void {
    const job = this.#jobs.get(m[0])
    if (!job) return
    if (m[1] instanceof ArrayBuffer) return job.taken(m[1])
    if (typeof m[1] === 'number') return job.progress?.(m[1])
    this.#jobs.delete(m[0])
    if (this.#jobs.size === 0) {
      this.#worker.unref()
      idleChanged(this)
    }
    if (typeof m[1] === 'string') job.finish({ hex: m[1], bytes: m[2] as number })
    else if (m[1] !== null) job.finish({ file: m[1] })
    else if (m.length === 2) job.finish(undefined)
    else job.finish({ err: Object.assign(new Error(m[2] as string), m[3] ? { code: m[3] } : {}, m[4] ? { side: m[4] } : {}) })
  }

  #die(err: Error): void {
    if (this.#dead) return
    this.#dead = err
    threadFailed = true
    log('decompression thread failed: %s', err.message)
    this.#forget()
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

/** The algorithms the decompression threads decompress. */
export type ThreadAlgorithm = 'gzip' | 'zstd'

/**
 * The path of zstd-napi's binding, which a thread loads itself, or undefined when it cannot be
 * found (then zstd is decompressed on the caller's thread, which reports why it cannot).
 */
function zstdBinding(): string | undefined {
  try {
    return resolveLazily('zstd-napi/binding')
  } catch (err) {
    log('no zstd binding for the threads: %s', (err as Error).message)
    return undefined
  }
}

/**
 * A gzip or zstd decompression on the decompression thread, or undefined when a thread failed
 * before (then the caller decompresses on its own thread).
 */
export function threadDecompression(dir: string, base: string, onError: CacheErrorHandler, algorithm: ThreadAlgorithm = 'gzip'): Decompression | undefined {
  if (threadFailed) return undefined
  const binding = algorithm === 'zstd' ? zstdBinding() : undefined
  if (algorithm === 'zstd' && !binding) return undefined
  try {
    return new ThreadDecompression(dir, base, onError, algorithm, binding)
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
 * A gzip or zstd {@link Decompression} on the decompression thread. The bytes given are copied into
 * pieces that are transferred to the thread, which sends each back once the inflater has taken
 * it; `write` waits while more than {@link SLACK} bytes are with the thread, and the inflater in
 * turn waits for the file, so memory stays bounded.
 */
class ThreadDecompression implements Decompression {
  readonly done: Promise<DerivedFile | undefined>
  readonly #thread: DecompressThread
  readonly #id: number
  #piece: { buffer: ArrayBuffer; bytes: Buffer; filled: number } | undefined
  /** Pieces with the thread. */
  #given = 0
  #waiting: (() => void) | undefined
  #over = false
  #aborted = false

  constructor(
    dir: string,
    base: string,
    onError: CacheErrorHandler,
    readonly algorithm: ThreadAlgorithm,
    binding: string | undefined,
  ) {
    const tmp = tempPath(dir, base)
    this.#thread = pickThread()
    let finish!: (file: DerivedFile | undefined) => void
    this.done = new Promise((resolve) => (finish = resolve))
    running++
    this.#id = this.#thread.start([tmp, algorithm, binding], {
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
        if (answer && 'err' in answer && !this.#aborted) onError(`decompressing ${base} (${algorithm})`, answer.err)
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

/** What {@link copyFileOnThread} does: copy a local file, hashing it, and maybe gunzip it too. */
export interface FileCopySpec {
  /** The file to read: a blob as a source stores it, not verified. */
  source: string
  /** The bytes it MUST have, or -1. */
  size: number
  /** The copy to create (a new file, mode 0644; it MUST NOT exist). */
  copy: string
  /** The algorithm the copy is hashed with (the blob digest's). */
  algorithm: DigestAlgorithm
  /** Whether the copy may be written with O_DIRECT (nothing reads it again soon). */
  direct: boolean
  /** Decompress the bytes into this new file as well (hashed with sha256), with `decompress`. */
  out?: string
  /** The algorithm of `out` (default gzip). */
  decompress?: ThreadAlgorithm
  /** For zstd: the path of zstd-napi's binding (filled in by copyFileOnThread). */
  zstd?: string
}

/** What {@link copyFileOnThread} made. */
export interface FileCopyResult {
  /** The copy's digest (hex, in the spec's algorithm) and size. */
  hex: string
  bytes: number
  /** With `out`: the decompressed file's sha256 (hex) and size, or why it was not made (it is gone then). */
  out?: { hex: string; bytes: number } | { error: Error }
}

/**
 * A failure of {@link copyFileOnThread}: reading the source (`source`: a missing file, a read
 * error, a size other than the expected one, as `SIZE_INVALID`) or writing the copy (`cache`,
 * also when the thread failed). Neither file is left.
 */
export class FileCopyError extends Error {
  constructor(
    message: string,
    readonly side: 'source' | 'cache',
    readonly code?: string,
  ) {
    super(message)
    this.name = 'FileCopyError'
  }
}

/**
 * Copies `spec.source` to the new file `spec.copy` on a decompression thread, which reads the
 * bytes into the memory they are written from and hashes them there, and with `spec.out` also
 * decompresses them into that file (a failure to do so loses only that file). Nothing passes through
 * this thread. `onProgress` hears the bytes read every 4 MiB. An abort rejects with the
 * signal's reason once the files are gone. Undefined when a thread failed before (the caller
 * then copies on its own).
 */
export function copyFileOnThread(
  spec: FileCopySpec,
  opts: { signal?: AbortSignal; onProgress?: (bytes: number) => void } = {},
): Promise<FileCopyResult> | undefined {
  if (threadFailed) return undefined
  if (spec.out && spec.decompress === 'zstd') {
    const zstd = zstdBinding()
    if (!zstd) return undefined
    spec = { ...spec, zstd }
  }
  const { signal } = opts
  signal?.throwIfAborted()
  let thread: DecompressThread
  try {
    thread = pickThread()
  } catch (err) {
    threadFailed = true
    log('no decompression thread: %s', (err as Error).message)
    return undefined
  }
  return new Promise<FileCopyResult>((resolve, reject) => {
    let id = 0
    const onAbort = () => thread.post([id, false])
    const removeAll = () => Promise.all([removeQuietly(spec.copy), spec.out ? removeQuietly(spec.out) : undefined])
    id = thread.start(spec, {
      taken: () => {},
      progress: opts.onProgress,
      finish: (answer) => {
        signal?.removeEventListener('abort', onAbort)
        if (answer && 'file' in answer) {
          const { hex, bytes, out } = answer.file
          const result: FileCopyResult = { hex, bytes }
          if (out && 'hex' in out) result.out = out
          else if (out) result.out = { error: Object.assign(new Error(out.error), out.code ? { code: out.code } : {}) }
          return resolve(result)
        }
        const err = answer && 'err' in answer ? answer.err : undefined
        // the thread removed both files already, unless it died
        removeAll().then(() => {
          if (!err || signal?.aborted) return reject(signal?.reason ?? new Error('aborted'))
          const side = err.side === 'source' ? 'source' : 'cache'
          reject(new FileCopyError(err.message, side, (err as NodeJS.ErrnoException).code))
        })
      },
    })
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}
