import debug from 'debug'
import { PassThrough, type Readable, Transform, type TransformCallback } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { compressStream, decompressStream, detectFileCompression, peekCompression } from './compression.js'
import { type Digest, verifyDigest } from './digest.js'
import { ImageError } from './errors.js'
import { layerMediaType } from './manifest.js'
import type { BlobInfo, CompressionAlgorithm, DetectedAlgorithm, ImageDestination, ImageSource, LayerCompression, PutBlobOptions } from './types.js'
import { mayLendSlabs, sharedPiece } from './io/hash-thread.js'

const log = debug('blobcache:copy')

/** A progress report of {@link copyImage}; `digest` and `size` are the source blob's. */
export interface CopyProgressEvent {
  /**
   * `start` before a blob is read, `progress` while it streams (at most every 1 MiB or 100 ms),
   * `done` once the destination holds it, `reused` when the destination already had it,
   * `skipped` when the same blob was already handled earlier in this copy.
   */
  type: 'start' | 'progress' | 'done' | 'reused' | 'skipped'
  digest: Digest
  /** Size of the source blob; -1 when unknown. */
  size: number
  /** Bytes read from the source so far (`progress`), or written to the destination (`done`). */
  bytes?: number
  /** Media type of the blob as written (on `done`). */
  mediaType?: string
  kind: 'config' | 'layer'
  /** On `done`, the digest of the bytes written when they differ from the source's. */
  newDigest?: Digest
}

/** What one blob became in the destination. */
export interface BlobOutcome {
  digest: Digest
  size: number
  /** Compression of the bytes written: an algorithm, null for none, undefined when not looked at. */
  compression: DetectedAlgorithm | null | undefined
  /** True when the bytes were (de/re)compressed on the way. */
  transformed: boolean
}

/** A change to a layer's compression: decompress, compress, or both (recompress). */
export interface CompressionStep {
  decompress?: DetectedAlgorithm
  compress?: CompressionAlgorithm
}

/**
 * Decides what to do with a layer compressed with `detected` (null: uncompressed) under `op`:
 * compress uncompressed layers with `algorithm`; recompress those in another algorithm when
 * the algorithm was asked for explicitly (and always bzip2/xz, which no manifest type names);
 * decompress compressed layers. Returns undefined when the bytes stay as they are.
 */
export function compressionStep(
  detected: DetectedAlgorithm | null,
  op: LayerCompression,
  algorithm: CompressionAlgorithm,
  explicitAlgorithm: boolean,
): CompressionStep | undefined {
  if (op === 'decompress') return detected === null ? undefined : { decompress: detected }
  if (op !== 'compress') return undefined
  if (detected === null) return { compress: algorithm }
  if (detected === 'bzip2' || detected === 'xz' || (explicitAlgorithm && detected !== algorithm)) {
    return { decompress: detected, compress: algorithm }
  }
  return undefined
}

/** Settings of a {@link BlobCopier}, fixed for one copy. */
export interface BlobCopierOptions {
  signal: AbortSignal
  op: LayerCompression
  algorithm: CompressionAlgorithm
  explicitAlgorithm: boolean
  level?: number
  concurrency: number
  onProgress?: (e: CopyProgressEvent) => void
}

/** What {@link BlobCopier.copy} needs to know about one blob. */
export interface BlobRequest {
  info: BlobInfo & { digest: Digest }
  kind: 'config' | 'layer'
  /** The layer's compression may be changed (a known layer media type, and the copy allows it). */
  mayTransform: boolean
  /** Compression the media type declares, used before (or instead of) looking at the bytes. */
  declared: DetectedAlgorithm | null | undefined
  /** Reuse may resolve to another digest (only when the manifest may change). */
  acceptVariant: boolean
}

/**
 * Copies blobs from one source to one destination: bounded concurrency, each digest once,
 * reuse first, a verified-file fast path, and (de)compression in flight. Counts what it did.
 */
export class BlobCopier {
  copied = 0
  reused = 0
  bytes = 0
  readonly #seen = new Map<string, Promise<BlobOutcome>>()
  readonly #queue: (() => void)[] = []
  #running = 0

  constructor(
    readonly src: ImageSource,
    readonly dest: ImageDestination,
    readonly opts: BlobCopierOptions,
  ) {}

  /**
   * Copies one blob, or returns the outcome of an earlier copy of the same digest in this copy.
   * The source bytes are always verified against `info.digest` (and size, when known).
   */
  copy(req: BlobRequest): Promise<BlobOutcome> {
    const key = `${req.kind}:${req.info.digest}`
    const earlier = this.#seen.get(key)
    if (earlier) {
      log('%s %s already handled in this copy', req.kind, req.info.digest)
      this.#emit({ type: 'skipped', digest: req.info.digest, size: req.info.size, kind: req.kind })
      return earlier
    }
    const p = this.#limit(() => this.#copyOnce(req))
    this.#seen.set(key, p)
    return p
  }

  async #limit<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#running >= this.opts.concurrency) await new Promise<void>((resolve) => this.#queue.push(resolve))
    this.#running++
    try {
      return await fn()
    } finally {
      this.#running--
      this.#queue.shift()?.()
    }
  }

  #emit(e: CopyProgressEvent): void {
    this.opts.onProgress?.(e)
  }

  async #copyOnce(req: BlobRequest): Promise<BlobOutcome> {
    const { signal } = this.opts
    const { info, kind } = req
    signal.throwIfAborted()
    const isConfig = kind === 'config'
    const planned = req.mayTransform && req.declared !== undefined ? this.#step(req.declared) : undefined
    if (!planned) {
      const found = await this.dest.tryReusingBlob(info, { signal, isConfig })
      if (found && (found.digest === undefined || found.digest === info.digest || req.acceptVariant)) {
        const digest = found.digest ?? info.digest
        log('%s %s reused%s', kind, info.digest, digest === info.digest ? '' : ` as ${digest}`)
        this.reused++
        this.#emit({ type: 'reused', digest: info.digest, size: info.size, kind })
        const compression = digest === info.digest ? req.declared : variantCompression(found)
        return { digest, size: found.size >= 0 ? found.size : info.size, compression, transformed: false }
      }
    }
    signal.throwIfAborted()
    const file = await this.src.getVerifiedBlobPath?.(info, { signal })
    if (file && this.dest.putBlobFromFile) {
      const detected = kind === 'layer' ? await detectFileCompression(file) : undefined
      const step = req.mayTransform && detected !== undefined ? this.#step(detected) : undefined
      if (!step) return this.#putFile(file, req, detected)
      log('layer %s: verified file %s needs %o, streaming instead', info.digest, file, step)
    } else if (!file && this.dest.putBlobFromLocalFile && this.src.getLocalBlobPath) {
      // the source's own file, read (and verified) by the destination itself
      const local = await this.src.getLocalBlobPath(info, { signal })
      const detected = local && kind === 'layer' ? await detectFileCompression(local).catch(() => undefined) : undefined
      if (local && (kind === 'config' || detected !== undefined)) {
        const step = req.mayTransform && detected !== undefined ? this.#step(detected) : undefined
        if (!step) return this.#putFile(local, req, detected, true)
        log('layer %s: local file %s needs %o, streaming instead', info.digest, local, step)
      }
    }
    return this.#stream(req)
  }

  #step(detected: DetectedAlgorithm | null): CompressionStep | undefined {
    return compressionStep(detected, this.opts.op, this.opts.algorithm, this.opts.explicitAlgorithm)
  }

  /**
   * Stores the blob from a local file: a verified one with putBlobFromFile, or (`unverified`)
   * the source's own with putBlobFromLocalFile, which verifies it and reports progress.
   */
  async #putFile(file: string, req: BlobRequest, detected: DetectedAlgorithm | null | undefined, unverified = false): Promise<BlobOutcome> {
    const { info, kind } = req
    log('%s %s from %s file %s', kind, info.digest, unverified ? 'local' : 'verified', file)
    this.#emit({ type: 'start', digest: info.digest, size: info.size, kind })
    const opts: PutBlobOptions = { signal: this.opts.signal, isConfig: kind === 'config' }
    let stored: BlobInfo
    if (unverified) {
      if (this.opts.onProgress) opts.onProgress = (bytes) => this.#emit({ type: 'progress', digest: info.digest, size: info.size, bytes, kind })
      stored = await this.dest.putBlobFromLocalFile!(file, info, opts)
    } else stored = await this.dest.putBlobFromFile!(file, info, opts)
    checkStored(stored, info.digest, info.size)
    const size = stored.size >= 0 ? stored.size : info.size
    this.#done(req, info.digest, size)
    return { digest: info.digest, size, compression: detected, transformed: false }
  }

  async #stream(req: BlobRequest): Promise<BlobOutcome> {
    const { signal } = this.opts
    const { info, kind } = req
    this.#emit({ type: 'start', digest: info.digest, size: info.size, kind })
    // between a registry and a local layout the bytes travel in pooled slabs (hash-thread.ts)
    const lend = mayLendSlabs(this.src, this.dest) ? { allocate: sharedPiece } : {}
    const { stream: raw } = await this.src.getBlob(info, { signal, ...lend })
    let body: Readable = raw
    let detected: DetectedAlgorithm | null | undefined
    if (kind === 'layer') {
      try {
        const peeked = await untilAborted(peekCompression(raw), signal, () => raw.destroy())
        body = peeked.stream
        detected = peeked.algorithm
      } catch (err) {
        raw.destroy()
        throw err
      }
    }
    const step = req.mayTransform && detected !== undefined ? this.#step(detected) : undefined
    const input = verifyDigest({ expected: info.digest, size: info.size >= 0 ? info.size : undefined })
    // The destination reads the last stage, a DigestStream: the input verifier when the bytes
    // pass unchanged, else the hasher of the output. It can take the digest from that stream
    // instead of hashing every byte a second time.
    // (no progress stage without a listener: every stage costs each chunk a call or two)
    const progress = this.opts.onProgress ? [this.#progress(info, kind)] : []
    const stages: Transform[] = step ? [input, ...progress] : progress
    try {
      if (step?.decompress) stages.push(decompressStream(step.decompress))
      if (step?.compress) stages.push(compressStream(step.compress, { level: this.opts.level }))
    } catch (err) {
      body.destroy()
      input.destroy()
      for (const t of stages) t.destroy()
      throw err
    }
    const output = step ? verifyDigest() : undefined
    const sink = output ?? input
    if (step) log('layer %s: %s bytes, %o', info.digest, detected ?? 'uncompressed', step)
    const putInfo: BlobInfo = step ? transformedInfo(info, step) : info
    const putting = this.dest.putBlob(sink, putInfo, { signal, isConfig: kind === 'config' })
    putting.catch((err: unknown) => sink.destroy(err as Error))
    const [piped, put] = await Promise.allSettled([pipeline([body, ...stages, sink], { signal }), putting])
    if (piped.status === 'rejected') throw piped.reason
    if (put.status === 'rejected') throw put.reason
    const stored = put.value
    const digest = output ? output.digest : info.digest
    const size = output ? output.bytes : input.bytes
    checkStored(stored, digest, size)
    this.#done(req, digest, size)
    return { digest, size, compression: step ? (step.compress ?? null) : detected, transformed: step !== undefined }
  }

  #done(req: BlobRequest, digest: Digest, size: number): void {
    this.copied++
    this.bytes += size
    const e: CopyProgressEvent = { type: 'done', digest: req.info.digest, size: req.info.size, bytes: size, kind: req.kind }
    if (req.info.mediaType) e.mediaType = req.info.mediaType
    if (digest !== req.info.digest) e.newDigest = digest
    this.#emit(e)
  }

  /** A pass-through that reports `progress` at most every 1 MiB or 100 ms. */
  #progress(info: BlobInfo & { digest: Digest }, kind: 'config' | 'layer'): Transform {
    const emit = (bytes: number) => this.#emit({ type: 'progress', digest: info.digest, size: info.size, bytes, kind })
    let bytes = 0
    let reportedBytes = 0
    let reportedAt = Date.now()
    return new Transform({
      highWaterMark: 1 << 20,
      transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
        bytes += chunk.length
        const now = Date.now()
        if (bytes - reportedBytes >= 1 << 20 || now - reportedAt >= 100) {
          reportedBytes = bytes
          reportedAt = now
          emit(bytes)
        }
        cb(null, chunk)
      },
      flush(cb: TransformCallback) {
        if (bytes !== reportedBytes) emit(bytes)
        cb()
      },
    })
  }
}

/** What the destination is told about a blob being (de/re)compressed: no digest yet. */
function transformedInfo(info: BlobInfo, step: CompressionStep): BlobInfo {
  const out: BlobInfo = { size: -1, compressionOperation: step.compress ? 'compress' : 'decompress' }
  if (step.compress) out.compressionAlgorithm = step.compress
  if (info.mediaType) {
    try {
      out.mediaType = layerMediaType(info.mediaType, step.compress ?? null)
    } catch {
      // a Docker type cannot say zstd; the manifest decides the final type
    }
  }
  return out
}

/** Compression of a variant a destination offered instead of the asked-for digest. */
function variantCompression(found: BlobInfo): DetectedAlgorithm | null | undefined {
  if (found.compressionOperation === 'decompress') return null
  if (found.compressionOperation === 'compress') return found.compressionAlgorithm ?? 'gzip'
  return undefined
}

/** Fails when the destination reports a different digest or size than what was sent. */
function checkStored(stored: BlobInfo, digest: Digest, size: number): void {
  if (stored.digest !== undefined && stored.digest !== digest) {
    throw new ImageError('DIGEST_INVALID', `destination stored ${stored.digest} for blob ${digest}`)
  }
  if (size >= 0 && stored.size >= 0 && stored.size !== size) {
    throw new ImageError('SIZE_INVALID', `destination stored ${stored.size} bytes for blob ${digest} of ${size} bytes`)
  }
}

/** The first bytes of a file (enough for compression magic numbers). */
/** Awaits `p`, rejecting with `signal.reason` (after `cleanup`) as soon as the signal aborts. */
async function untilAborted<T>(p: Promise<T>, signal: AbortSignal, cleanup: () => void): Promise<T> {
  // Whichever side loses the race must not surface later as an unhandled rejection.
  p.catch(() => {})
  if (signal.aborted) {
    cleanup()
    throw signal.reason
  }
  let onAbort!: () => void
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => {
      cleanup()
      reject(signal.reason)
    }
    signal.addEventListener('abort', onAbort, { once: true })
  })
  try {
    return await Promise.race([p, aborted])
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
}
