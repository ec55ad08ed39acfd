// The decompressed form of a gzip layer, made on a worker thread. In a cold copy through the
// cache the main thread otherwise hashes both the compressed and the decompressed bytes and
// drives zlib and a second file write for every layer; moving the derived entry's work (gunzip
// callbacks, sha256 of the output, its file writes) to another thread lets it run on the second
// core beside the copy. The worker source uses only Node's built-in modules and is run with
// `eval`, so it works from the ESM and CJS builds and from the TypeScript sources alike.
import { Worker } from 'node:worker_threads'
import debug from 'debug'
import type { Digest } from '../digest.js'
import { ImageError } from '../errors.js'
import { FILE_MODE, removeQuietly, tempPath } from './files.js'
import type { CacheErrorHandler } from './variants.js'

const log = debug('blobcache:blobcache:gunzip-worker')

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createGunzip } = require('node:zlib')
const { createHash } = require('node:crypto')
const { createWriteStream } = require('node:fs')
const { Transform, pipeline } = require('node:stream')
const jobs = new Map()
parentPort.on('message', (m) => {
  if (m.op === 'start') {
    const gunzip = createGunzip({ chunkSize: 1 << 20 })
    const hash = createHash('sha256')
    const hasher = new Transform({ highWaterMark: 1 << 20, transform(c, _e, cb) { hash.update(c); cb(null, c) } })
    const out = createWriteStream(m.tmp, { flags: 'wx', mode: m.mode, highWaterMark: 1 << 20 })
    jobs.set(m.id, gunzip)
    pipeline(gunzip, hasher, out, (err) => {
      jobs.delete(m.id)
      if (err) parentPort.postMessage({ id: m.id, error: String(err && err.message), code: err && err.code })
      else parentPort.postMessage({ id: m.id, hex: hash.digest('hex') })
    })
  } else if (m.op === 'write') {
    const gunzip = jobs.get(m.id)
    const chunk = m.chunk
    const ack = () => parentPort.postMessage({ id: m.id, ack: chunk.byteLength, buffer: chunk.buffer }, [chunk.buffer])
    if (!gunzip || gunzip.destroyed) return ack()
    gunzip.write(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength), ack)
  } else if (m.op === 'end') {
    const gunzip = jobs.get(m.id)
    if (gunzip) gunzip.end()
  } else if (m.op === 'abort') {
    const gunzip = jobs.get(m.id)
    if (gunzip) gunzip.destroy(new Error('aborted'))
  }
})
`

/** Bytes that may wait for the worker before a write waits for it. */
const SLACK = 8 << 20

interface Job {
  ack(bytes: number): void
  finish(hex: string | undefined, err?: Error): void
}

/** Buffers handed back by the worker, reused for the next chunks. */
const spare: ArrayBuffer[] = []
let worker: Worker | undefined
let active = 0
let nextId = 1
const jobs = new Map<number, Job>()

function getWorker(): Worker {
  if (worker) return worker
  const w = new Worker(WORKER_SOURCE, { eval: true })
  w.unref()
  w.on('message', (m: { id: number; ack?: number; buffer?: ArrayBuffer; hex?: string; error?: string; code?: string }) => {
    if (m.buffer && spare.length < 16) spare.push(m.buffer)
    const job = jobs.get(m.id)
    if (!job) return
    if (m.ack !== undefined) job.ack(m.ack)
    else {
      jobs.delete(m.id)
      if (--active === 0) w.unref()
      const err = m.error === undefined ? undefined : Object.assign(new Error(m.error), { code: m.code })
      job.finish(m.hex, err)
    }
  })
  const fail = (err: Error) => {
    if (worker === w) worker = undefined
    active = 0
    for (const job of jobs.values()) job.finish(undefined, err)
    jobs.clear()
  }
  w.on('error', fail)
  w.on('exit', (code) => fail(new ImageError('CACHE_INVALID', `gunzip worker exited with code ${code}`)))
  log('started gunzip worker')
  return (worker = w)
}

/** A copy of `chunk` in a transferable buffer (recycled when one of the right size is spare). */
function transferable(chunk: Buffer): Uint8Array {
  let buf: ArrayBuffer | undefined
  while ((buf = spare.pop()) && buf.byteLength < chunk.length);
  const out = new Uint8Array(buf ?? new ArrayBuffer(Math.max(chunk.length, 1 << 20)), 0, chunk.length)
  out.set(chunk)
  return out
}

/**
 * Decompresses gzip bytes written to it into a temporary file in `dir` on a worker thread,
 * hashing the output (sha256). Same contract as the in-process `Decompression`: a failure stops
 * it quietly (writes do nothing, {@link done} resolves undefined and the file is removed).
 */
export class GunzipOnWorker {
  readonly algorithm = 'gzip' as const
  readonly done: Promise<{ tmp: string; digest: Digest } | undefined>
  readonly #id = nextId++
  readonly #worker: Worker
  #pending = 0
  #waiters: (() => void)[] = []
  #failed = false
  #aborted = false

  constructor(dir: string, base: string, onError: CacheErrorHandler) {
    const tmp = tempPath(dir, base)
    this.#worker = getWorker()
    if (active++ === 0) this.#worker.ref()
    this.done = new Promise((resolve) => {
      jobs.set(this.#id, {
        ack: (n) => {
          this.#pending -= n
          this.#wake()
        },
        finish: (hex, err) => {
          this.#failed = true
          this.#wake()
          if (hex !== undefined && !err) {
            resolve({ tmp, digest: `sha256:${hex}` as Digest })
            return
          }
          if (!this.#aborted) onError(`decompressing ${base} (gzip)`, err)
          removeQuietly(tmp).then(() => resolve(undefined))
        },
      })
    })
    this.#worker.postMessage({ op: 'start', id: this.#id, tmp, mode: FILE_MODE })
  }

  /** Feeds bytes; resolves when the worker can take more (or has failed). */
  async write(chunk: Buffer): Promise<void> {
    if (this.#failed) return
    const copy = transferable(chunk)
    this.#pending += copy.byteLength
    this.#worker.postMessage({ op: 'write', id: this.#id, chunk: copy }, [copy.buffer as ArrayBuffer])
    while (this.#pending > SLACK && !this.#failed) await new Promise<void>((r) => this.#waiters.push(r))
  }

  /** Ends the input; {@link done} settles when everything is decompressed. */
  end(): void {
    if (!this.#failed) this.#worker.postMessage({ op: 'end', id: this.#id })
  }

  /** Stops it; {@link done} then resolves undefined and the temporary file is gone. */
  abort(): void {
    if (this.#failed) return
    this.#aborted = true
    this.#worker.postMessage({ op: 'abort', id: this.#id })
  }

  #wake(): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }
}
