// Hashing on a thread of its own. A pull spent a third of its main-thread time hashing layers
// (sha256 of 164 MiB: about 115 ms) while the main thread also has to read the sockets; a
// worker thread hashes bytes the main thread has put in shared memory, so both go on at once.
// Pulling 4 x 41 MiB from a local registry this took the main thread from about 400 to 310 ms.
import type { Worker } from 'node:worker_threads'
import debug from 'debug'
import type { DigestAlgorithm } from '../digest.js'
import { type StoppableThread, idleChanged, startScriptWorker, trackThread } from './script-worker.js'

const log = debug('blobcache:io:hash-thread')

// The worker's code (a CommonJS script). Messages in: [id, algorithm, buffer, offset, length]
// hashes a piece (answered with [id]), [id, algorithm] answers [id, hex digest] and forgets the
// hash, [id] forgets it. Messages of one id are handled in order.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createHash } = require('node:crypto')
const hashes = new Map()
parentPort.on('message', (m) => {
  const id = m[0]
  try {
    if (m.length === 5) {
      let h = hashes.get(id)
      if (!h) hashes.set(id, (h = createHash(m[1])))
      h.update(new Uint8Array(m[2], m[3], m[4]))
      parentPort.postMessage([id])
    } else if (m.length === 2) {
      const h = hashes.get(id) ?? createHash(m[1])
      hashes.delete(id)
      parentPort.postMessage([id, h.digest('hex')])
    } else hashes.delete(id)
  } catch (err) {
    hashes.delete(id)
    parentPort.postMessage([id, null, String(err && err.message || err)])
  }
})
`

type Waiter = { resolve: (hex?: string) => void; reject: (err: Error) => void }

/**
 * The process's hashing thread, started on first use (it takes some 30 ms to start, while the
 * first pieces wait in memory); it does not keep the process alive when idle. If it fails, every
 * hash it holds fails with that error, and the next hash starts a new thread.
 */
class HashThread implements StoppableThread {
  readonly #worker: Worker
  /** Answers awaited, per hash id, in the order the requests were sent. */
  readonly #waiting = new Map<number, Waiter[]>()
  #pending = 0
  /** Hashes made and not yet digested or forgotten: the thread keeps their state. */
  #open = 0
  #next = 1
  #dead: Error | undefined

  constructor() {
    this.#worker = startScriptWorker<[number, (string | null)?, string?]>(WORKER_SOURCE, 'blobcache hashing', (m) => this.#answer(m), (err) => this.#die(err))
    trackThread(this)
  }

  get dead(): boolean {
    return this.#dead !== undefined
  }

  get idle(): boolean {
    return this.#open === 0 && this.#pending === 0 && !this.#dead
  }

  /** Ends the thread on purpose; the next hash starts a new one. */
  async stop(): Promise<void> {
    if (this.#dead) return
    this.#dead = new Error('the hashing thread was stopped')
    this.#forget()
    await this.#worker.terminate()
  }

  #forget(): void {
    trackThread(this, false)
    if (thread === this) thread = undefined
  }

  newId(): number {
    if (this.#open++ === 0) idleChanged(this)
    return this.#next++
  }

  /** A hash is digested or forgotten: the thread keeps nothing of it once its requests are answered. */
  closed(): void {
    if (--this.#open === 0) idleChanged(this)
  }

  /** Sends a request and resolves its answer. */
  request(message: unknown[]): Promise<string | undefined> {
    if (this.#dead) return Promise.reject(this.#dead)
    const id = message[0] as number
    return new Promise((resolve, reject) => {
      let queue = this.#waiting.get(id)
      if (!queue) this.#waiting.set(id, (queue = []))
      queue.push({ resolve, reject })
      if (this.#pending++ === 0) this.#worker.ref()
      this.#worker.postMessage(message)
    })
  }

  /** Forgets a hash (no answer). */
  forget(id: number): void {
    if (!this.#dead) this.#worker.postMessage([id])
  }

  #answer([id, hex, error]: [number, (string | null)?, string?]): void {
    const queue = this.#waiting.get(id)
    const waiter = queue?.shift()
    if (!waiter) return
    if (queue!.length === 0) this.#waiting.delete(id)
    if (--this.#pending === 0) {
      this.#worker.unref()
      idleChanged(this)
    }
    if (error !== undefined) waiter.reject(new Error(`the hashing thread failed: ${error}`))
    else waiter.resolve(hex ?? undefined)
  }

  #die(err: Error): void {
    if (this.#dead) return
    this.#dead = err
    log('hashing thread failed: %s', err.message)
    this.#forget()
    for (const queue of this.#waiting.values()) for (const w of queue) w.reject(err)
    this.#waiting.clear()
    this.#pending = 0
  }
}

let thread: HashThread | undefined

function hashThread(): HashThread {
  if (!thread || thread.dead) thread = new HashThread()
  return thread
}

/**
 * An incremental hash computed on the hashing thread. Pieces are given as shared memory,
 * which MUST NOT change until `update` resolves; `digest` resolves the hex digest of all
 * pieces in the order they were given. `dispose` forgets the hash (after a failure).
 */
export class ThreadHash {
  readonly #thread = hashThread()
  readonly #id = this.#thread.newId()
  /** Digested or disposed: the thread holds nothing of it any more. */
  #done = false

  constructor(readonly algorithm: DigestAlgorithm) {}

  /** Hashes `length` bytes of `buffer` from `offset`; resolves once they are read. */
  async update(buffer: SharedArrayBuffer, offset: number, length: number): Promise<void> {
    await this.#thread.request([this.#id, this.algorithm, buffer, offset, length])
  }

  /** The hex digest of every piece given. */
  async digest(): Promise<string> {
    this.#done = true
    const answer = this.#thread.request([this.#id, this.algorithm])
    this.#thread.closed()
    return (await answer)!
  }

  /** Forgets the hash (after a failure); nothing once digested. */
  dispose(): void {
    if (this.#done) return
    this.#done = true
    this.#thread.closed()
    this.#thread.forget(this.#id)
  }
}

// ---- shared memory ------------------------------------------------------------------------

/** Bytes of a slab: a coalesced download piece (1 MiB and at most one 64 KiB read more) fits. */
export const SLAB_BYTES = (1 << 20) + (64 << 10)
/**
 * Free slabs kept for reuse in the process (34 MiB): four downloads at once each have about
 * eight pieces under way (being filled, in stream buffers, queued for their file).
 */
const SLABS_KEPT = 32
const freeSlabs: SharedArrayBuffer[] = []
/** Slabs of the pool, which are given back once done with. */
const slabs = new WeakSet<SharedArrayBuffer>()

/** Slabs made and slabs reused, in the process (see {@link slabCounts}). */
const counts = { made: 0, reused: 0 }

/** A slab of shared memory ({@link SLAB_BYTES}), reused when one is free; give it back with {@link giveBackSlab}. */
export function newSlab(): SharedArrayBuffer {
  let memory = freeSlabs.pop()
  if (memory) counts.reused++
  else {
    memory = new SharedArrayBuffer(SLAB_BYTES)
    counts.made++
  }
  slabs.add(memory)
  return memory
}

/** How many slabs the process has made, and how many times it reused one (for tests and debugging). */
export function slabCounts(): { made: number; reused: number } {
  return { ...counts }
}

/** `memory` when it is a slab of the pool, else undefined. */
export function pooledSlab(memory: SharedArrayBuffer): SharedArrayBuffer | undefined {
  return slabs.has(memory) ? memory : undefined
}

/** Gives a slab back for reuse; nothing MAY use it afterwards. */
export function giveBackSlab(memory: SharedArrayBuffer): void {
  if (freeSlabs.length < SLABS_KEPT && slabs.has(memory) && !freeSlabs.includes(memory)) freeSlabs.push(memory)
}

/** Drops the free slabs (when no file is being written), so that idle memory is not kept. */
export function dropFreeSlabs(): void {
  freeSlabs.length = 0
}

/**
 * Mark the two ends between which a copy may carry a blob in pooled slabs (copy-blob.ts): a
 * source whose `getBlob` reads into the `allocate` it is given ({@link slabLender}), and a
 * destination whose `putBlob` writes every chunk of the stream to a {@link BlobFile} and keeps
 * none, the file giving pooled slabs back once written ({@link slabTaker}). Reused slabs spare
 * the kernel faulting in fresh memory for every piece (pulling 4 x 41 MiB: some 20 000 page
 * faults). Set on the classes themselves and never forwarded: a wrapper in between (a cache
 * that tees) may hold chunks that the two ends do not know of.
 */
export const slabLender: unique symbol = Symbol('blobcache.slabLender')
/** See {@link slabLender}. */
export const slabTaker: unique symbol = Symbol('blobcache.slabTaker')

/** What a copy gives the `getBlob` of a {@link slabLender}: where to read the blob's pieces. */
export interface LendingOptions {
  allocate?: (length: number) => Buffer
}

/** True when a copy from `src` to `dest` may carry blobs in pooled slabs (see {@link slabLender}). */
export function mayLendSlabs(src: object, dest: object): boolean {
  return (src as { [slabLender]?: unknown })[slabLender] === true && (dest as { [slabTaker]?: unknown })[slabTaker] === true
}

/**
 * A buffer of `length` bytes in shared memory, for `allocate` of openBlob: the pieces of a
 * download are gathered there, hashed on the hashing thread without another copy, and their
 * slab is reused once the piece is written and hashed (given back by the blob file).
 */
export function sharedPiece(length: number): Buffer {
  return length <= SLAB_BYTES ? Buffer.from(newSlab(), 0, length) : Buffer.from(new SharedArrayBuffer(length))
}
