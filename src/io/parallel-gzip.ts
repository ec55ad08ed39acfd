// gzip compression spread over libuv's thread pool, as pigz and Go's pgzip (which skopeo uses)
// do it: the input is cut into 1 MiB blocks, and each block is deflated on its own by a pool
// thread, with the 32 KiB before it as the dictionary (so the output is within a few bytes per
// block of one stream's), ending on a byte boundary (a sync flush; the last block ends the
// stream). The blocks' outputs are joined in order between one gzip header and one trailer,
// whose CRC-32 the main thread computes as the blocks pass. The result is one ordinary gzip
// member that any reader takes, and the same bytes for the same input and level however the
// input was chunked or the threads were scheduled.
//
// One zlib stream keeps one core busy: a 338 MB layer (a tar of /usr/bin) took about 8 s to
// deflate at level 6, while skopeo used both cores. Up to MAX_IN_FLIGHT blocks of a stream are
// with the pool at once, so memory stays bounded whatever the layer's size.
import { Transform, type TransformCallback } from 'node:stream'
import type * as Zlib from 'node:zlib'
import { requireLazily } from '../lazy-require.js'

/** Bytes of input deflated per pool task. */
export const BLOCK_BYTES = 1 << 20
/** Bytes of the preceding input a block may refer back to: all deflate's window holds. */
const WINDOW = 32 << 10
/** Blocks of one stream with the pool at once. */
const MAX_IN_FLIGHT = 4
/**
 * zlib's output buffer per block: room for all of a block's output, even stored, so that the
 * pool deflates a block in one task. With zlib's default 16 KiB, a block went back and forth
 * between the pool and the main thread once per 16 KiB of output: the bench's zstd -> gzip case
 * took 2.44-2.83 s instead of 1.89-2.15 s, and the real layers 6.4 s instead of 4.4 s. It also
 * sets the size of the stored blocks zlib writes, so it is part of what makes the bytes.
 */
const OUT_BYTES = BLOCK_BYTES + (64 << 10)

/** A block whose sample carries more bits a byte than this is stored as it is (see {@link looksIncompressible}). */
const INCOMPRESSIBLE_BITS = 7.95
/** The sample: this many windows of SAMPLE_WINDOW bytes, spread over the block. */
const SAMPLE_WINDOWS = 16
const SAMPLE_WINDOW = 4096

/** The gzip header: no name or time (mtime 0), OS 255 (unknown), so the bytes are the same everywhere. */
const HEADER = Buffer.from([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])

type ZlibModule = typeof Zlib

/** True when this Node.js can compress in parallel (zlib.crc32 came in Node 20.15). */
export function parallelGzipAvailable(): boolean {
  return typeof (requireLazily('node:zlib') as ZlibModule).crc32 === 'function'
}

/**
 * A Transform that gzips what passes through it at `level` (1-9), deflating 1 MiB blocks on
 * libuv's thread pool in parallel (see the file comment). Requires {@link parallelGzipAvailable}.
 */
export class ParallelGzip extends Transform {
  readonly #zlib: ZlibModule
  readonly #level: number
  #block = Buffer.allocUnsafe(BLOCK_BYTES)
  #filled = 0
  /** The last bytes of the input before the block being filled (the next block's dictionary). */
  #before: Buffer | undefined
  #crc = 0
  #size = 0
  /** Blocks with the pool, in input order. */
  readonly #pending: Promise<Buffer>[] = []

  constructor(level: number) {
    super({ highWaterMark: BLOCK_BYTES })
    if (!Number.isInteger(level) || level < 1 || level > 9) throw new RangeError(`gzip level ${level}: not 1-9`)
    this.#zlib = requireLazily('node:zlib') as ZlibModule
    this.#level = level
    this.push(HEADER)
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, cb: TransformCallback): void {
    let offset = 0
    while (offset < chunk.length) {
      const n = chunk.copy(this.#block, this.#filled, offset)
      this.#filled += n
      offset += n
      if (this.#filled === BLOCK_BYTES) this.#deflate(false)
    }
    this.#drain(MAX_IN_FLIGHT - 1).then(() => cb(), cb)
  }

  override _flush(cb: TransformCallback): void {
    this.#deflate(true)
    this.#drain(0).then(() => {
      const trailer = Buffer.allocUnsafe(8)
      trailer.writeUInt32LE(this.#crc >>> 0, 0)
      trailer.writeUInt32LE(this.#size % 2 ** 32, 4)
      cb(null, trailer)
    }, cb)
  }

  /** Hands the filled part of the block to the pool; `last` ends the deflate stream there. */
  #deflate(last: boolean): void {
    const block = this.#block.subarray(0, this.#filled)
    this.#crc = this.#zlib.crc32(block, this.#crc)
    this.#size += block.length
    const { constants } = this.#zlib
    const level = looksIncompressible(block) ? 0 : this.#level
    const opts: Zlib.ZlibOptions = { level, finishFlush: last ? constants.Z_FINISH : constants.Z_SYNC_FLUSH, chunkSize: OUT_BYTES }
    if (this.#before) opts.dictionary = this.#before
    const deflated = new Promise<Buffer>((resolve, reject) => this.#zlib.deflateRaw(block, opts, (err, out) => (err ? reject(err) : resolve(out))))
    // awaited in turn by #drain; one that fails after the stream was destroyed is dropped
    deflated.catch(() => {})
    this.#pending.push(deflated)
    // the block stays the pool's until its task is done: the next one is a new buffer. Only the
    // last block can be shorter than the window, so the next dictionary is this block's end
    this.#before = block.subarray(Math.max(0, block.length - WINDOW))
    if (!last) this.#block = Buffer.allocUnsafe(BLOCK_BYTES)
    this.#filled = 0
  }

  /** Passes on, in order, the output of the oldest blocks until at most `keep` are with the pool. */
  async #drain(keep: number): Promise<void> {
    while (this.#pending.length > keep) {
      const out = await this.#pending[0]
      this.#pending.shift()
      this.push(out)
    }
  }
}

/**
 * True when `block` looks like compressed or random data, which deflate cannot shrink: the bytes
 * of a 64 KiB sample (16 windows of 4 KiB spread over it) carry more than 7.95 bits each. zlib
 * spends as long on such a block as on text (43 MiB/s at any level here) to store it anyway;
 * storing it outright takes a copy. Text and machine code carry 4-6.5 bits a byte. What this
 * can lose is a repeat of high-entropy bytes within 32 KiB of itself, which deflate would have
 * found. Blocks under 64 KiB are always deflated.
 */
export function looksIncompressible(block: Buffer): boolean {
  if (block.length < SAMPLE_WINDOWS * SAMPLE_WINDOW) return false
  const counts = new Uint32Array(256)
  const stride = Math.floor((block.length - SAMPLE_WINDOW) / (SAMPLE_WINDOWS - 1))
  for (let w = 0; w < SAMPLE_WINDOWS; w++) {
    const start = w * stride
    for (let i = start; i < start + SAMPLE_WINDOW; i++) counts[block[i]]++
  }
  const total = SAMPLE_WINDOWS * SAMPLE_WINDOW
  let bits = 0
  for (let b = 0; b < 256; b++) {
    if (counts[b] === 0) continue
    const p = counts[b] / total
    bits -= p * Math.log2(p)
  }
  return bits > INCOMPRESSIBLE_BITS
}
