// The hash of a stream's bytes, taken as they pass by. Small blobs are hashed on the main thread
// at once; large ones on the hashing thread: bytes already in shared memory where they are, other
// bytes after a copy into buffers handed to the thread and back (reused). A pull of 4 x 41 MiB
// spent about 105 ms of its main thread in sha256 before this; the copy costs about a tenth of
// that. (Copying into shared memory instead is 2-3 times slower: V8 copies into it with relaxed
// atomic stores, not memmove.)
import { type Hash, createHash } from 'node:crypto'
import debug from 'debug'
import type { DigestAlgorithm } from '../digest.js'
import { ThreadHash, pooledSlab } from './hash-thread.js'

const log = debug('blobcache:io:stream-hash')

/** Blobs at least this large are hashed on the hashing thread; smaller ones inline. */
export const THREAD_HASH_MIN = 4 << 20
/** Bytes a hash may have sent to the thread, not yet read, before `update` asks its caller to wait. */
export const HASH_HIGH_WATER = 4 << 20
/** Bytes of a buffer that copied bytes are gathered in, and sent to the thread in one message. */
const COPY_BYTES = 2 << 20
/** Free copy buffers kept for reuse while some hash is open (16 MiB). */
const COPY_BUFFERS_KEPT = 8
const freeBuffers: ArrayBuffer[] = []
/** Hashes that may still copy (neither digested nor disposed). */
let openHashes = 0

/**
 * An incremental hash of a stream whose chunks arrive in order. With a size known to be at least
 * {@link THREAD_HASH_MIN} it hashes on the hashing thread from the start; with an unknown size
 * it hashes inline and keeps (references to) the first chunks, moving to the thread once that
 * many bytes have passed. `update` takes a chunk, which MUST NOT change afterwards (pieces of
 * the slab pool, whose owner may give them back, are copied); `digest` resolves the hex digest;
 * `dispose` MUST be called when the hash is abandoned.
 */
export class StreamHash {
  readonly algorithm: DigestAlgorithm
  #inline: Hash | undefined
  #thread: ThreadHash | undefined
  /** Chunks hashed inline while the size is unknown, for a move to the thread. */
  #kept: Buffer[] | undefined
  #keptBytes = 0
  /** The buffer copied bytes are gathered in. */
  #copy: { bytes: Buffer; filled: number } | undefined
  /** Bytes sent to the thread and not yet read by it (the copy buffer being filled aside). */
  #held = 0
  #waiting: (() => void)[] = []
  #failure: Error | undefined
  /** The digest was taken, or the hash disposed: nothing more may be given. */
  #done = false
  #disposed = false

  /** `size` is the byte count when known, else -1. */
  constructor(algorithm: DigestAlgorithm, size = -1) {
    this.algorithm = algorithm
    openHashes++
    if (size >= THREAD_HASH_MIN) this.#thread = startThreadHash(algorithm)
    if (!this.#thread) {
      this.#inline = createHash(algorithm)
      if (size < 0) this.#kept = []
    }
  }

  /** True once the bytes go to the hashing thread. */
  get threaded(): boolean {
    return this.#thread !== undefined
  }

  /**
   * Hashes `chunk`. Returns false when the caller should wait for {@link ready} before giving
   * more. Throws the hashing thread's error once it has failed.
   */
  update(chunk: Buffer): boolean {
    if (this.#failure) throw this.#failure
    if (this.#done) throw new Error('StreamHash: update after digest or dispose')
    if (chunk.length === 0) return true
    if (this.#inline) {
      this.#inline.update(chunk)
      if (!this.#kept) return true
      this.#kept.push(pooled(chunk) ? Buffer.from(chunk) : chunk)
      this.#keptBytes += chunk.length
      if (this.#keptBytes >= THREAD_HASH_MIN) this.#moveToThread()
      return this.#held < HASH_HIGH_WATER
    }
    this.#send(chunk)
    return this.#held < HASH_HIGH_WATER
  }

  /** Resolves once the hash holds less than {@link HASH_HIGH_WATER} bytes; rejects after a failure. */
  ready(): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure)
    if (this.#held < HASH_HIGH_WATER || this.#done) return Promise.resolve()
    return new Promise((resolve, reject) =>
      this.#waiting.push(() => (this.#failure ? reject(this.#failure) : resolve())),
    )
  }

  /** The hex digest of every byte given; nothing MAY be given afterwards. */
  async digest(): Promise<string> {
    if (this.#failure) throw this.#failure
    if (this.#done) throw new Error('StreamHash: digest taken twice or after dispose')
    this.#kept = undefined
    if (this.#inline) {
      this.#close()
      return this.#inline.digest('hex')
    }
    this.#sendCopy()
    this.#close()
    const hex = await this.#thread!.digest()
    if (this.#failure) throw this.#failure
    return hex
  }

  /** Forgets the hash; buffers still being read are kept for reuse once read. Never throws. */
  dispose(): void {
    if (this.#disposed) return
    this.#disposed = true
    if (!this.#done) this.#close()
    this.#kept = undefined
    this.#thread?.dispose()
    if (this.#copy) giveBack(this.#copy.bytes.buffer as ArrayBuffer)
    this.#copy = undefined
    this.#wake()
  }

  /** Takes no more bytes. */
  #close(): void {
    this.#done = true
    if (--openHashes === 0) freeBuffers.length = 0
  }

  #moveToThread(): void {
    const kept = this.#kept!
    this.#kept = undefined
    this.#keptBytes = 0
    this.#thread = startThreadHash(this.algorithm)
    if (!this.#thread) return // hashing on here, inline
    this.#inline = undefined
    for (const chunk of kept) this.#send(chunk)
  }

  /** Sends `chunk` to the thread: where it is when in shared memory of its own, else copied. */
  #send(chunk: Buffer): void {
    if (chunk.buffer instanceof SharedArrayBuffer && !pooled(chunk)) {
      this.#sendCopy()
      const length = chunk.length
      this.#held += length
      this.#thread!.update(chunk.buffer, chunk.byteOffset, length).then(
        () => this.#read(length),
        (err: Error) => this.#read(length, err),
      )
      return
    }
    let offset = 0
    while (offset < chunk.length) {
      this.#copy ??= { bytes: Buffer.from(freeBuffers.pop() ?? new ArrayBuffer(COPY_BYTES)), filled: 0 }
      const copy = this.#copy
      const n = chunk.copy(copy.bytes, copy.filled, offset)
      copy.filled += n
      offset += n
      if (copy.filled === COPY_BYTES) this.#sendCopy()
    }
  }

  /** Hands the copy buffer being filled, if any, to the thread; it comes back for reuse once read. */
  #sendCopy(): void {
    const copy = this.#copy
    if (!copy) return
    this.#copy = undefined
    const buffer = copy.bytes.buffer as ArrayBuffer
    if (copy.filled === 0) return giveBack(buffer)
    this.#held += COPY_BYTES
    this.#thread!.updateTransferred(buffer, 0, copy.filled).then(
      (back) => {
        giveBack(back)
        this.#read(COPY_BYTES)
      },
      (err: Error) => this.#read(COPY_BYTES, err),
    )
  }

  /** `weight` bytes held are read by the thread (or failed). */
  #read(weight: number, err?: Error): void {
    this.#held -= weight
    if (err && !this.#disposed) this.#failure ??= err
    this.#wake()
  }

  #wake(): void {
    if (this.#held >= HASH_HIGH_WATER && !this.#failure && !this.#done) return
    const waiting = this.#waiting
    this.#waiting = []
    for (const w of waiting) w()
  }
}

/** A hash on the hashing thread, or undefined (logged) when no thread can be started here. */
function startThreadHash(algorithm: DigestAlgorithm): ThreadHash | undefined {
  try {
    return new ThreadHash(algorithm)
  } catch (err) {
    log('no hashing thread (%s): hashing inline', (err as Error).message)
    return undefined
  }
}

/** Keeps a copy buffer back from the thread for reuse, while hashes are open. */
function giveBack(buffer: ArrayBuffer): void {
  if (openHashes > 0 && freeBuffers.length < COPY_BUFFERS_KEPT && buffer.byteLength === COPY_BYTES) freeBuffers.push(buffer)
}

/** True for a piece of the slab pool, which its owner gives back once done with it. */
function pooled(chunk: Buffer): boolean {
  return chunk.buffer instanceof SharedArrayBuffer && pooledSlab(chunk.buffer) !== undefined
}
