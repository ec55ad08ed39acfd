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
 * A pass-through Transform that hashes the bytes flowing through it. With `expected`, it fails
 * at end of stream with {@link DigestMismatchError}; with `size`, it fails with `SIZE_INVALID` as
 * soon as more bytes arrive than announced, or at the end if fewer did.
 */
export class DigestStream extends Transform {
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

  /** The digest of everything seen; available once the stream has flushed. */
  get digest(): Digest {
    if (!this.#digest) throw new Error('DigestStream: digest read before the stream ended')
    return this.#digest
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
    if (this.#size >= 0 && this.#bytes !== this.#size) {
      cb(new ImageError('SIZE_INVALID', `${this.#what()}: got ${this.#bytes} bytes, expected ${this.#size}`))
    } else if (this.#expected && this.#digest !== this.#expected) {
      cb(new DigestMismatchError(this.#expected, this.#digest))
    } else cb()
  }

  #what(): string {
    return this.#expected ? `blob ${this.#expected}` : 'blob'
  }
}

/** Returns a {@link DigestStream}: `pipeline(src, verifyDigest({ expected }), sink)`. */
export function verifyDigest(opts: VerifyOptions = {}): DigestStream {
  return new DigestStream(opts)
}
