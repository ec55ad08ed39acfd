import type * as ChildProcess from 'node:child_process'
import { accessSync, constants as fsConstants } from 'node:fs'
import { open } from 'node:fs/promises'
import { delimiter, join } from 'node:path'
import { Readable, Transform, type TransformCallback, type Writable, finished } from 'node:stream'
import type * as Zlib from 'node:zlib'
import debug from 'debug'
import type * as Zstd from 'zstd-napi'
import { ImageError } from './errors.js'
import { ParallelGzip, parallelGzipAvailable } from './io/parallel-gzip.js'
import { requireLazily } from './lazy-require.js'
import type { CompressionAlgorithm, DetectedAlgorithm } from './types.js'

const log = debug('blobcache:compression')

/** The algorithms blobcache can write, in order of preference. */
export const compressionAlgorithms: readonly CompressionAlgorithm[] = ['gzip', 'zstd']

/** Every algorithm {@link detectCompression} recognises; bzip2 and xz are read only. */
export const detectedAlgorithms: readonly DetectedAlgorithm[] = ['gzip', 'zstd', 'bzip2', 'xz']

/** True when `s` names an algorithm blobcache can write (`gzip` or `zstd`). */
export function isCompressionAlgorithm(s: unknown): s is CompressionAlgorithm {
  return s === 'gzip' || s === 'zstd'
}

/** Bytes {@link peekCompression} reads before deciding; enough for every magic number. */
export const PEEK_BYTES = 8

const CHUNK = 1 << 20

/**
 * The gzip level when none is given (or -1). Not zlib's 6: on real layers (a tar of /usr/bin, one
 * of Python's library and /usr/share/doc) zlib's level 4 was 1.5 times as fast as its level 6,
 * and its output 1.5-2.6% larger, yet still smaller than skopeo's (whose default came out
 * between zlib's levels 1 and 4 in size). Level 6 and up remain a flag away.
 */
export const DEFAULT_GZIP_LEVEL = 4

/** The compression of the file at `path`, from its first bytes (see {@link detectCompression}); rejects when it cannot be read. */
export async function detectFileCompression(path: string): Promise<DetectedAlgorithm | null> {
  const handle = await open(path, 'r')
  try {
    const head = Buffer.alloc(PEEK_BYTES)
    const { bytesRead } = await handle.read(head, 0, PEEK_BYTES, 0)
    return detectCompression(head.subarray(0, bytesRead))
  } finally {
    await handle.close()
  }
}

/**
 * Detects the compression of a blob from its first bytes: gzip (`1f 8b 08`), zstd (`28 b5 2f
 * fd`, or a skippable frame `5? 2a 4d 18`), bzip2 (`BZh`) or xz (`fd 37 7a 58 5a 00`). Returns
 * null for anything else, including a buffer too short to tell.
 */
export function detectCompression(buf: Uint8Array): DetectedAlgorithm | null {
  const has = (...magic: number[]) => buf.length >= magic.length && magic.every((b, i) => buf[i] === b)
  if (has(0x1f, 0x8b, 0x08)) return 'gzip'
  if (has(0x28, 0xb5, 0x2f, 0xfd)) return 'zstd'
  if (buf.length >= 4 && (buf[0] & 0xf0) === 0x50 && buf[1] === 0x2a && buf[2] === 0x4d && buf[3] === 0x18) return 'zstd'
  if (has(0x42, 0x5a, 0x68)) return 'bzip2'
  if (has(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) return 'xz'
  return null
}

/**
 * Reads the first bytes of `stream` (at least {@link PEEK_BYTES}, or all of it when shorter)
 * and detects their compression. The returned stream MUST be used instead of the original: it
 * yields every byte, the peeked ones first. Rejects with the stream's error if it fails first.
 */
export function peekCompression(stream: Readable): Promise<{ algorithm: DetectedAlgorithm | null; stream: Readable }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let total = 0
    let done = false
    const finish = (ended: boolean, err?: Error | null) => {
      if (done) return
      done = true
      stream.off('readable', onReadable)
      stopWatching()
      if (err) {
        reject(err)
        return
      }
      // one chunk is passed on as it is: it may be in shared memory (see DigestStream)
      const head = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks)
      const algorithm = detectCompression(head)
      if (ended) {
        resolve({ algorithm, stream: Readable.from(head.length > 0 ? [head] : [], { objectMode: false }) })
      } else {
        if (head.length > 0) stream.unshift(head)
        resolve({ algorithm, stream })
      }
    }
    const onReadable = () => {
      let chunk: Buffer | string | null
      while (total < PEEK_BYTES && (chunk = stream.read()) !== null) {
        const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk
        chunks.push(buf)
        total += buf.length
      }
      if (total >= PEEK_BYTES) finish(false)
    }
    // `finished` also covers a stream that has already ended or failed before we were called.
    const stopWatching = finished(stream, { writable: false }, (err) => finish(true, err))
    stream.on('readable', onReadable)
  })
}

/** Options of {@link compressStream}. */
export interface CompressOptions {
  /**
   * Compression level. gzip: 0-9, default 4 ({@link DEFAULT_GZIP_LEVEL}; -1 means the default).
   * zstd: 1-19 (up to 22, negative for faster), default 3.
   */
  level?: number
}

/**
 * A Transform that compresses with `alg`. gzip deflates 1 MiB blocks in parallel on libuv's
 * thread pool into one gzip member (see io/parallel-gzip.ts; level 0, or a Node.js before 20.15,
 * uses one node:zlib stream); zstd uses zstd-napi and writes one frame with a content checksum.
 * Throws `UNSUPPORTED` for an unknown algorithm or a level outside the algorithm's range.
 */
export function compressStream(alg: CompressionAlgorithm, opts: CompressOptions = {}): Transform {
  const level = opts.level
  if (level !== undefined && !Number.isInteger(level)) throw unsupportedLevel(alg, level)
  switch (alg) {
    case 'gzip': {
      if (level !== undefined && (level < -1 || level > 9)) throw unsupportedLevel(alg, level)
      const gzipLevel = level === undefined || level === -1 ? DEFAULT_GZIP_LEVEL : level
      if (gzipLevel > 0 && parallelGzipAvailable()) return new ParallelGzip(gzipLevel)
      return new (gzipStreams().Gzip)({ level: gzipLevel, chunkSize: CHUNK })
    }
    case 'zstd':
      if (level !== undefined && (level < -(1 << 17) || level > 22)) throw unsupportedLevel(alg, level)
      return new (zstdStreams().Compress)({ compressionLevel: level ?? 3, checksumFlag: true })
    default:
      throw new ImageError('UNSUPPORTED', `cannot compress with ${JSON.stringify(alg)}`)
  }
}

/**
 * A Transform that decompresses `alg`. gzip accepts several concatenated members; zstd accepts
 * several frames and skips skippable frames. bzip2 and xz run the system `bzip2 -dc` / `xz -dc`
 * (killed when the stream is destroyed) and throw `UNSUPPORTED` when that is not installed.
 * Corrupt or truncated input fails the stream with `COMPRESSION_INVALID`.
 */
export function decompressStream(alg: DetectedAlgorithm): Transform {
  switch (alg) {
    case 'gzip':
      return new (gzipStreams().Gunzip)({ chunkSize: CHUNK })
    case 'zstd':
      return new (zstdStreams().Decompress)()
    case 'bzip2':
    case 'xz': {
      const binary = findExecutable(alg)
      if (!binary) throw new ImageError('UNSUPPORTED', `${alg} decompression needs the ${alg} program, which is not on PATH`)
      return new ProcessTransform(alg, binary, ['-dc'])
    }
    default:
      throw new ImageError('UNSUPPORTED', `cannot decompress ${JSON.stringify(alg)}`)
  }
}

function unsupportedLevel(alg: string, level: number): ImageError {
  return new ImageError('UNSUPPORTED', `${alg} compression level ${level} is out of range`)
}

function corrupt(alg: string, err: Error): ImageError {
  return new ImageError('COMPRESSION_INVALID', `${alg} data is invalid: ${err.message}`, { cause: err })
}

/** zlib reports data errors with a `Z_*` code; other errors (aborts, peers' errors) pass unchanged. */
function isZlibError(err: Error | null): err is Error {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && code.startsWith('Z_')
}

let gzip: { Gzip: typeof Zlib.Gzip; Gunzip: typeof Zlib.Gunzip } | undefined

/**
 * node:zlib's gzip streams with our error mapping. node:zlib is loaded on first use, like
 * zstd-napi: commands that never compress (a pull into the image cache) do not pay for it.
 */
function gzipStreams(): NonNullable<typeof gzip> {
  if (gzip) return gzip
  const zlib = requireLazily('node:zlib') as typeof Zlib
  class Gzip extends zlib.Gzip {
    override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
      super._destroy(err, (e) => cb(e && isZlibError(e) ? corrupt('gzip', e) : e))
    }
  }
  class Gunzip extends zlib.Gunzip {
    override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
      super._destroy(err, (e) => cb(e && isZlibError(e) ? corrupt('gzip', e) : e))
    }
  }
  return (gzip = { Gzip, Gunzip })
}

let zstd: { Compress: typeof Zstd.CompressStream; Decompress: typeof Zstd.DecompressStream } | undefined

/** zstd-napi's streams with our error mapping; the native module is loaded on first use. */
function zstdStreams(): NonNullable<typeof zstd> {
  if (zstd) return zstd
  const { CompressStream, DecompressStream } = requireLazily('zstd-napi') as typeof Zstd
  class Compress extends CompressStream {
    override _transform(chunk: unknown, enc: string, done: TransformCallback): void {
      super._transform(chunk, enc, (err, data) => done(err ? corrupt('zstd', err) : null, data))
    }
  }
  class Decompress extends DecompressStream {
    override _transform(chunk: unknown, enc: string, done: TransformCallback): void {
      super._transform(chunk, enc, (err, data) => done(err ? corrupt('zstd', err) : null, data))
    }

    override _flush(done: TransformCallback): void {
      super._flush((err, data) => done(err ? corrupt('zstd', err) : null, data))
    }
  }
  return (zstd = { Compress, Decompress })
}

const executables = new Map<string, string | undefined>()

/** The absolute path of an executable on PATH, or undefined. Cached per name and PATH. */
export function findExecutable(name: string): string | undefined {
  const path = process.env.PATH ?? ''
  const key = `${name}\0${path}`
  if (executables.has(key)) return executables.get(key)
  let found: string | undefined
  for (const dir of path.split(delimiter)) {
    if (!dir) continue
    const candidate = join(dir, name)
    try {
      accessSync(candidate, fsConstants.X_OK)
      found = candidate
      break
    } catch {
      // not here
    }
  }
  executables.set(key, found)
  return found
}

const STDERR_LIMIT = 4096

/**
 * A Transform backed by a child process reading stdin and writing stdout. The process starts
 * with the first write (or at end of input), is killed when the stream is destroyed, and a
 * non-zero exit fails the stream with `COMPRESSION_INVALID` carrying its stderr.
 */
class ProcessTransform extends Transform {
  #child: ChildProcess.ChildProcessByStdio<Writable, Readable, Readable> | undefined
  #exit: { code: number | null; signal: string | null } | undefined
  #onExit: (() => void) | undefined
  #stderr = ''

  constructor(
    readonly algorithm: string,
    readonly binary: string,
    readonly args: string[],
  ) {
    super({ readableHighWaterMark: CHUNK, writableHighWaterMark: CHUNK })
  }

  /** The process id of the child, once started. */
  get pid(): number | undefined {
    return this.#child?.pid
  }

  #start(): ChildProcess.ChildProcessByStdio<Writable, Readable, Readable> {
    if (this.#child) return this.#child
    const { spawn } = requireLazily('node:child_process') as typeof ChildProcess
    const child = spawn(this.binary, this.args, { stdio: ['pipe', 'pipe', 'pipe'] })
    log('spawned %s %s (pid %d)', this.binary, this.args.join(' '), child.pid)
    this.#child = child
    // EPIPE when the child stops reading: its exit status says why.
    child.stdin.on('error', () => {})
    child.stdout.on('data', (chunk: Buffer) => {
      if (!this.push(chunk)) child.stdout.pause()
    })
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (s: string) => {
      if (this.#stderr.length < STDERR_LIMIT) this.#stderr += s.slice(0, STDERR_LIMIT - this.#stderr.length)
    })
    child.on('error', (err) => this.destroy(err))
    child.on('close', (code, signal) => {
      this.#exit = { code, signal }
      log('%s exited: code %s signal %s', this.binary, code, signal)
      if (this.destroyed) return
      if (code !== 0) {
        const why = this.#stderr.trim() || (signal ? `killed by ${signal}` : `exit status ${code}`)
        this.destroy(corrupt(this.algorithm, new Error(`${this.algorithm} -dc: ${why}`)))
        return
      }
      this.#onExit?.()
    })
    return child
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const child = this.#start()
    if (this.#exit || !child.stdin.writable) {
      cb() // the child is gone; its exit status decides the outcome
      return
    }
    child.stdin.write(chunk, () => cb())
  }

  override _flush(cb: TransformCallback): void {
    const child = this.#start()
    if (this.#exit) {
      cb()
      return
    }
    this.#onExit = () => cb()
    child.stdin.end()
  }

  override _read(size: number): void {
    this.#child?.stdout.resume()
    super._read(size)
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    const child = this.#child
    if (child && !this.#exit && child.exitCode === null && child.signalCode === null) {
      log('killing %s (pid %d)', this.binary, child.pid)
      child.kill('SIGKILL')
    }
    child?.stdin.destroy()
    child?.stdout.destroy()
    cb(err)
  }
}
