// A blob file being written and hashed: pieces are written in order, one `writev` at a time
// (what arrives meanwhile goes into the next one), without copying them, and flushed to disk
// in the background as the file grows. Large blobs are hashed on the hashing thread as they are
// written: pieces in shared memory where they are, others after a copy into slabs of shared
// memory (reused from file to file).
import { type Hash, createHash } from 'node:crypto'
import { close, fdatasync, fsync, open, writev } from 'node:fs'
import type { DigestAlgorithm } from '../digest.js'
import { SLAB_BYTES, ThreadHash, dropFreeSlabs, giveBackSlab, newSlab, pooledSlab } from './hash-thread.js'

/** Bytes one file may hold in memory (being written or hashed) before `write` asks to wait. */
export const HIGH_WATER = 4 << 20
/** Blobs at least this large are hashed on the hashing thread; smaller ones inline. */
export const THREAD_HASH_MIN = 4 << 20
/**
 * Bytes written since the last flush that start a background `fdatasync` (with `flush`).
 * Otherwise the page cache holds a whole layer until the fsync before the rename, which then
 * writes it all at the very end: pulling 4 x 41 MiB, those fsyncs took 35-57 ms, against 3-5 ms
 * after background flushes. The final fsync is still made, and still decides.
 */
export const FLUSH_BYTES = 8 << 20
/** Background flushes running at once in the process (each holds one of libuv's four threads). */
const MAX_FLUSHES = 2
let flushes = 0
/** Blob files open in the process: the free slabs are kept only while there are some. */
let openFiles = 0

/** Bytes on their way to the file (and the hashing thread). */
interface Piece {
  bytes: Buffer
  /** A slab to give back once the piece is done. */
  slab?: SharedArrayBuffer
  /** Operations (write, hash) still using the bytes. */
  busy: number
}

/** Options of {@link BlobFile.create}. */
export interface BlobFileOptions {
  /** Hash the bytes with this algorithm (see {@link BlobFile.finish}); none when undefined. */
  algorithm?: DigestAlgorithm
  /** The expected byte count, or -1: large blobs are hashed on the hashing thread. */
  size?: number
  /** Flush the file to disk as it is written (for files that will be fsynced). */
  flush?: boolean
}

/**
 * A new file (created with `wx`, mode 0644) written strictly from the start. `write` takes a
 * piece, which MUST NOT change afterwards; `finish` resolves the byte count and hex digest once
 * everything is written and hashed; `sync` makes the file durable; `close` MUST be called on
 * every path: it waits for anything still using the descriptor before closing it.
 */
export class BlobFile {
  readonly path: string
  readonly #fd: number
  readonly #inline: Hash | undefined
  readonly #thread: ThreadHash | undefined
  readonly #flush: boolean
  /** Bytes written so far (the position of the next write). */
  #written = 0
  /** The slab being filled. */
  #slab: { memory: SharedArrayBuffer; bytes: Buffer; filled: number } | undefined
  /** Pieces waiting for the write in flight to finish. */
  #queue: Piece[] = []
  #writing = false
  /** Bytes of pieces not yet done (written and hashed). */
  #held = 0
  #operations = 0
  #unflushed = 0
  #flushing = false
  #onDrain: (() => void) | undefined
  #idle: (() => void)[] = []
  #failure: { err: Error } | undefined
  #closed = false

  private constructor(path: string, fd: number, opts: BlobFileOptions) {
    this.path = path
    this.#fd = fd
    this.#flush = opts.flush ?? false
    if (opts.algorithm) {
      if ((opts.size ?? -1) >= THREAD_HASH_MIN) this.#thread = new ThreadHash(opts.algorithm)
      else this.#inline = createHash(opts.algorithm)
    }
    openFiles++
  }

  /** Creates `path`, which MUST NOT exist. */
  static create(path: string, opts: BlobFileOptions = {}): Promise<BlobFile> {
    return new Promise((resolve, reject) => {
      open(path, 'wx', 0o644, (err, fd) => {
        if (err) return reject(err)
        try {
          resolve(new BlobFile(path, fd, opts))
        } catch (e) {
          close(fd, () => reject(e))
        }
      })
    })
  }

  /** The first write or hashing error, if any. */
  get failure(): Error | undefined {
    return this.#failure?.err
  }

  /**
   * Takes `chunk`. Returns false when the caller should stop until `onDrain` is called (the
   * file holds {@link HIGH_WATER} bytes). After a failure the bytes are dropped.
   */
  write(chunk: Buffer, onDrain: () => void): boolean {
    if (this.#closed) throw new Error('BlobFile: write after close')
    if (this.#failure || chunk.length === 0) return true
    if (!this.#thread) {
      this.#inline?.update(chunk)
      // a pooled slab comes only from a copy that lends them to this file alone (slabLender)
      this.#add({ bytes: chunk, busy: 0, slab: chunk.buffer instanceof SharedArrayBuffer ? pooledSlab(chunk.buffer) : undefined })
    } else if (chunk.buffer instanceof SharedArrayBuffer && !this.#slab) {
      this.#add({ bytes: chunk, busy: 0, slab: pooledSlab(chunk.buffer) })
    } else {
      this.#copy(chunk)
    }
    if (this.#held < HIGH_WATER) return true
    this.#onDrain = onDrain
    return false
  }

  /** Gathers `chunk` in slabs, adding each full one. */
  #copy(chunk: Buffer): void {
    let offset = 0
    while (offset < chunk.length) {
      if (!this.#slab) {
        const memory = newSlab()
        this.#slab = { memory, bytes: Buffer.from(memory), filled: 0 }
        this.#held += SLAB_BYTES
      }
      const slab = this.#slab
      const n = chunk.copy(slab.bytes, slab.filled, offset)
      slab.filled += n
      offset += n
      if (slab.filled === SLAB_BYTES) this.#addSlab()
    }
  }

  #addSlab(): void {
    const slab = this.#slab
    if (!slab) return
    this.#slab = undefined
    this.#held -= SLAB_BYTES
    this.#add({ bytes: slab.bytes.subarray(0, slab.filled), slab: slab.memory, busy: 0 })
  }

  /** Queues a piece for writing and, on the hashing thread, hashing. */
  #add(piece: Piece): void {
    this.#held += piece.slab ? SLAB_BYTES : piece.bytes.length
    if (this.#thread) {
      this.#begin(piece)
      const { buffer, byteOffset, length } = piece.bytes
      this.#thread.update(buffer as SharedArrayBuffer, byteOffset, length).then(
        () => this.#end(piece),
        (err: Error) => this.#end(piece, err),
      )
    }
    this.#begin(piece)
    this.#queue.push(piece)
    if (!this.#writing) this.#writeQueued()
  }

  #writeQueued(): void {
    const pieces = this.#queue
    this.#queue = []
    this.#writing = true
    this.#operations++
    this.#writeBatch(pieces, pieces.map((p) => p.bytes))
  }

  /** Writes `bufs` (the bytes of `pieces`, or what is left of them) at the end of the file. */
  #writeBatch(pieces: Piece[], bufs: Buffer[]): void {
    const length = bufs.reduce((n, b) => n + b.length, 0)
    writev(this.#fd, bufs, this.#written, (err, written) => {
      if (!err) {
        this.#written += written
        this.#unflushed += written
        if (written < length && !this.#closed) {
          // stopped short (libuv writes on until an error, and reports the bytes written): the
          // rest again, which reports that error
          return this.#writeBatch(pieces, rest(bufs, written))
        }
      }
      this.#writing = false
      this.#operations--
      for (const p of pieces) this.#end(p, err ?? undefined)
      if (this.#queue.length && !this.#failure && !this.#closed) this.#writeQueued()
      // also while writes go on: pieces that arrive as fast as they are written never leave
      // the queue empty, and the whole file was then flushed at the end
      this.#maybeFlush()
      this.#settle()
    })
  }

  #maybeFlush(): void {
    if (!this.#flush || this.#flushing || this.#closed || this.#failure) return
    if (this.#unflushed < FLUSH_BYTES || flushes >= MAX_FLUSHES) return
    this.#unflushed = 0
    this.#flushing = true
    this.#operations++
    flushes++
    fdatasync(this.#fd, (err) => {
      flushes--
      this.#flushing = false
      this.#operations--
      // a write-back error: a later fsync may succeed without the data, so it counts
      if (err) this.#failure ??= { err }
      this.#settle()
    })
  }

  #begin(piece: Piece): void {
    piece.busy++
    this.#operations++
  }

  #end(piece: Piece, err?: Error): void {
    if (err) this.#failure ??= { err }
    this.#operations--
    if (--piece.busy === 0) {
      this.#held -= piece.slab ? SLAB_BYTES : piece.bytes.length
      if (piece.slab) giveBackSlab(piece.slab)
      if (this.#onDrain && this.#held < HIGH_WATER) {
        const drain = this.#onDrain
        this.#onDrain = undefined
        drain()
      }
    }
    this.#settle()
  }

  #settle(): void {
    if (this.#operations > 0) return
    const idle = this.#idle
    this.#idle = []
    for (const f of idle) f()
  }

  #whenIdle(): Promise<void> {
    if (this.#operations === 0) return Promise.resolve()
    return new Promise((resolve) => this.#idle.push(resolve))
  }

  /**
   * Writes what is left and resolves the byte count and, when hashing, the hex digest. Rejects
   * with the first write or hashing error.
   */
  async finish(): Promise<{ bytes: number; hex?: string }> {
    this.#addSlab()
    await this.#whenIdle()
    if (this.#failure) throw this.#failure.err
    const hex = this.#inline ? this.#inline.digest('hex') : this.#thread ? await this.#thread.digest() : undefined
    return { bytes: this.#written, hex }
  }

  /** fsyncs the file (after `finish`). */
  async sync(): Promise<void> {
    await this.#whenIdle()
    if (this.#failure) throw this.#failure.err
    await new Promise<void>((resolve, reject) => fsync(this.#fd, (err) => (err ? reject(err) : resolve())))
  }

  /** Drops what is queued, waits for what is running, and closes the file. Never rejects. */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    this.#onDrain = undefined
    const queued = this.#queue
    this.#queue = []
    for (const p of queued) this.#end(p)
    if (this.#slab) giveBackSlab(this.#slab.memory)
    this.#slab = undefined
    await this.#whenIdle()
    this.#thread?.dispose()
    if (--openFiles === 0) dropFreeSlabs()
    await new Promise<void>((resolve) => close(this.#fd, () => resolve()))
  }
}

/** `bufs` without their first `n` bytes. */
function rest(bufs: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = []
  for (const b of bufs) {
    if (n >= b.length) n -= b.length
    else {
      out.push(n > 0 ? b.subarray(n) : b)
      n = 0
    }
  }
  return out
}
