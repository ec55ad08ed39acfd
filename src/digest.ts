import { createHash, type Hash } from 'node:crypto'
import { Transform, type TransformCallback } from 'node:stream'
import { DigestMismatchError, ImageError } from './errors.js'

/** A validated content digest, `sha256:<64 hex>` or `sha512:<128 hex>`; built only by this module. */
export type Digest = string & { readonly __digest: true }

/** The digest algorithms blobcache accepts. */
export type DigestAlgorithm = 'sha256' | 'sha512'

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha256: 64, sha512: 128 }
const DIGEST_RE = /^(sha256|sha512):([0-9a-f]+)$/

/** True when `s` is a well-formed digest: known algorithm, lowercase hex of the right length. */
export function isDigest(s: unknown): s is Digest {
  if (typeof s !== 'string') return false
  const m = DIGEST_RE.exec(s)
  return m !== null && m[2].length === HEX_LENGTH[m[1] as DigestAlgorithm]
}

/**
 * Validates `s` and returns it as a {@link Digest}. Throws `DIGEST_INVALID` for anything else,
 * so a digest can be joined into a path only after passing here.
 */
export function parseDigest(s: unknown): Digest {
  if (isDigest(s)) return s
  const shown = typeof s === 'string' ? JSON.stringify(s.length > 200 ? s.slice(0, 200) + '…' : s) : String(s)
  throw new ImageError('DIGEST_INVALID', `invalid digest ${shown}`)
}

/** The algorithm part of a digest. */
export function digestAlgorithm(d: Digest): DigestAlgorithm {
  return d.slice(0, d.indexOf(':')) as DigestAlgorithm
}

/** The hex part of a digest. */
export function digestHex(d: Digest): string {
  return d.slice(d.indexOf(':') + 1)
}

/** Builds a digest from an algorithm and hex, validating both. */
export function digestFrom(algorithm: string, hex: string): Digest {
  return parseDigest(`${algorithm}:${hex}`)
}

/** The digest of bytes held in memory (default sha256). */
export function digestOf(data: Buffer | Uint8Array | string, algorithm: DigestAlgorithm = 'sha256'): Digest {
  return `${algorithm}:${createHash(algorithm).update(data).digest('hex')}` as Digest
}

/** Options of {@link verifyDigest}. */
export interface VerifyOptions {
  /** The digest the bytes must hash to; none means only compute it. */
  expected?: Digest
  /** The exact byte count expected; -1 or undefined means unknown. */
  size?: number
  /** Algorithm used when `expected` is not given. Default `sha256`. */
  algorithm?: DigestAlgorithm
}

/**
 * Implemented by streams that hash every byte they pass on. Once such a stream has ended, a
 * consumer may call this to get the digest and byte count of what it read, instead of hashing
 * the same bytes again. A stream that verifies an expected digest fails before it ends if the
 * bytes do not match, so reading it to its end is itself the proof.
 */
export const streamDigest: unique symbol = Symbol.for('blobcache.streamDigest')

/** A stream whose digest can be taken from it once it has ended; see {@link streamDigest}. */
export interface DigestingStream {
  /** The algorithm it hashes with. */
  readonly digestAlgorithm: DigestAlgorithm
  [streamDigest](): { digest: Digest; bytes: number }
}

/**
 * The stream as a {@link DigestingStream} when it is one and hashes with the algorithm of
 * `expected` (sha256 when none is given), else undefined: then the caller hashes itself.
 */
export function digestingStream(stream: unknown, expected?: Digest): DigestingStream | undefined {
  const s = stream as Partial<DigestingStream> | null
  if (typeof s?.[streamDigest] !== 'function') return undefined
  return s.digestAlgorithm === (expected ? digestAlgorithm(expected) : 'sha256') ? (s as DigestingStream) : undefined
}

/**
 * A pass-through Transform that hashes the bytes flowing through it. With `expected`, it fails
 * at end of stream with {@link DigestMismatchError}; with `size`, it fails with `SIZE_INVALID` as
 * soon as more bytes arrive than announced, or at the end if fewer did.
 */
export class DigestStream extends Transform implements DigestingStream {
  readonly #hash: Hash
  readonly #algorithm: DigestAlgorithm
  readonly #expected: Digest | undefined
  readonly #size: number
  #bytes = 0
  #digest: Digest | undefined

  constructor(opts: VerifyOptions = {}) {
    super({ highWaterMark: 1 << 20 })
    this.#expected = opts.expected
    this.#algorithm = opts.expected ? digestAlgorithm(opts.expected) : (opts.algorithm ?? 'sha256')
    this.#hash = createHash(this.#algorithm)
    this.#size = opts.size ?? -1
  }

  /** Bytes seen so far. */
  get bytes(): number {
    return this.#bytes
  }

  /** The algorithm this stream hashes with. */
  get digestAlgorithm(): DigestAlgorithm {
    return this.#algorithm
  }

  /** The digest of everything seen; available once the stream has flushed. */
  get digest(): Digest {
    if (!this.#digest) throw new Error('DigestStream: digest read before the stream ended')
    return this.#digest
  }

  [streamDigest](): { digest: Digest; bytes: number } {
    return { digest: this.digest, bytes: this.#bytes }
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.#bytes += chunk.length
    if (this.#size >= 0 && this.#bytes > this.#size) {
      cb(new ImageError('SIZE_INVALID', `${this.#what()}: more than the expected ${this.#size} bytes`))
      return
    }
    this.#hash.update(chunk)
    cb(null, chunk)
  }

  override _flush(cb: TransformCallback): void {
    this.#digest = `${this.#algorithm}:${this.#hash.digest('hex')}` as Digest
    try {
      checkDigest({ digest: this.#digest, bytes: this.#bytes }, { expected: this.#expected, size: this.#size })
      cb()
    } catch (err) {
      cb(err as Error)
    }
  }

  #what(): string {
    return this.#expected ? `blob ${this.#expected}` : 'blob'
  }
}

/**
 * Throws what a {@link DigestStream} with these options would fail with for bytes that hashed
 * to `got.digest`: `SIZE_INVALID` for a wrong count, {@link DigestMismatchError} for a wrong digest.
 */
export function checkDigest(got: { digest: Digest; bytes: number }, opts: Pick<VerifyOptions, 'expected' | 'size'>): void {
  const what = opts.expected ? `blob ${opts.expected}` : 'blob'
  if (opts.size !== undefined && opts.size >= 0 && got.bytes !== opts.size) {
    throw new ImageError('SIZE_INVALID', `${what}: got ${got.bytes} bytes, expected ${opts.size}`)
  }
  if (opts.expected && got.digest !== opts.expected) throw new DigestMismatchError(opts.expected, got.digest)
}

/** Returns a {@link DigestStream}: `pipeline(src, verifyDigest({ expected }), sink)`. */
export function verifyDigest(opts: VerifyOptions = {}): DigestStream {
  return new DigestStream(opts)
}
