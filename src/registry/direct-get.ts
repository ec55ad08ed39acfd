// Blob downloads read straight from the socket. Node's HTTP client hands a body on in the
// pieces the socket delivered (64 KiB at most), each copied once more by its parser into a new
// buffer; a download then gathers them into 1 MiB pieces, a third copy, into fresh memory the
// kernel has to fault in. Pulling 4 x 41 MiB from a local registry that way cost about 600 ms
// of CPU, of which the bytes themselves (the kernel's copy, hashing, the file writes) need less
// than half. Here a GET goes over a connection of its own whose reads land directly in the
// 1 MiB pieces that are passed on (`onread` of net and tls), after a head parsed by hand: the
// same download took 240 ms of CPU.
//
// Only what a blob GET needs is spoken: one request, `connection: close`, a body delimited by
// Content-Length or by the end of the connection. An answer in another form (chunked, 1xx)
// makes the caller send the request again through Node's client; so does a proxy.
import type { Socket } from 'node:net'
import type { TLSSocket } from 'node:tls'
import { Readable } from 'node:stream'
import debug from 'debug'
import { requireLazily } from '../lazy-require.js'

const log = debug('blobcache:registry:direct-get')

/** Bytes passed on at once: a piece is handed on once it holds this many. */
export const DIRECT_PIECE_BYTES = 1 << 20
/** Bytes of a buffer a piece is read into: one more read of up to 64 KiB fits after {@link DIRECT_PIECE_BYTES}. */
export const DIRECT_BUFFER_BYTES = DIRECT_PIECE_BYTES + (64 << 10)
/** Longest response head read. */
const HEAD_LIMIT = 64 << 10

/** How {@link directGet} connects: TLS settings for https, and the idle timeout. */
export interface DirectConnection {
  /** Verify the server's certificate (https). */
  verify: boolean
  /** The secure context (authorities, client certificate), or Node's default. */
  context: import('node:tls').SecureContext | undefined
  /** A connection silent this long fails with `ETIMEDOUT`, in ms. */
  idleTimeout: number
}

/** Options of {@link directGet}. */
export interface DirectGetInit {
  headers: Record<string, string>
  signal?: AbortSignal
  /** Returns a buffer of `length` ({@link DIRECT_BUFFER_BYTES}) bytes to read a piece into. Default: a new one. */
  allocate?: (length: number) => Buffer
}

/**
 * The answer of {@link directGet}: its status and headers (names in lower case, repeated ones
 * joined as Node's client joins them) and the body as a stream of pieces of about 1 MiB, each a
 * view of a buffer from `allocate`. A connection cut before the last byte errors it with
 * `ECONNRESET`.
 */
export class DirectResponse extends Readable {
  statusCode = 0
  headers: Record<string, string | string[] | undefined> = {}
  #resume: (() => void) | undefined
  #stop: ((err: Error | null) => void) | undefined

  constructor() {
    super({ highWaterMark: DIRECT_PIECE_BYTES })
  }

  /** @internal */
  attach(resume: () => void, stop: (err: Error | null) => void): void {
    this.#resume = resume
    this.#stop = stop
  }

  override _read(): void {
    this.#resume?.()
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.#stop?.(err)
    cb(err)
  }
}

const CRLFCRLF = Buffer.from('\r\n\r\n')
/** Where reads go once a response is over (the socket is being closed; what lands is dropped). */
const SCRATCH = Buffer.allocUnsafe(16 << 10)

/**
 * Sends `GET url` on a new connection and resolves once the answer's head is in, with the body
 * unread; resolves undefined, having closed the connection, when the answer is not in a form
 * read here (the caller then sends the request its usual way). Fails like a socket does
 * (`ECONNREFUSED`, `ECONNRESET`, TLS errors, `ETIMEDOUT`); an abort destroys the connection and
 * rejects with the signal's reason, or errors the body with it.
 */
export function directGet(url: URL, init: DirectGetInit, conn: DirectConnection): Promise<DirectResponse | undefined> {
  const signal = init.signal
  if (signal?.aborted) return Promise.reject(signal.reason)
  const allocate = init.allocate ?? ((n: number) => Buffer.allocUnsafeSlow(n))
  const res = new DirectResponse()
  return new Promise<DirectResponse | undefined>((resolve, reject) => {
    const request = requestHead(url, init.headers)
    let settled = false
    let finished = false
    /** The buffer being filled, and how many of its bytes are filled. */
    let piece: Buffer | undefined
    let filled = 0
    /** Body bytes still to come; -1 until the end of the connection. */
    let remaining = -1
    let inHead = true
    let paused = false

    const fail = (err: Error) => {
      if (finished) return
      finished = true
      socket.destroy()
      cleanup()
      if (!settled) {
        settled = true
        reject(signal?.aborted ? signal.reason : err)
      } else if (!res.destroyed) res.destroy(signal?.aborted ? signal.reason : err)
    }
    const onAbort = () => fail(signal!.reason as Error)
    const cleanup = () => signal?.removeEventListener('abort', onAbort)

    const giveOn = () => {
      if (!piece || filled === 0) return true
      const out = piece.subarray(0, filled)
      piece = undefined
      filled = 0
      return res.push(out)
    }
    const end = () => {
      if (finished) return
      finished = true
      cleanup()
      giveOn()
      res.push(null)
      socket.destroy()
    }

    const onHead = (): boolean => {
      const at = piece!.subarray(0, filled).indexOf(CRLFCRLF)
      if (at < 0) {
        if (filled >= HEAD_LIMIT) fail(Object.assign(new Error(`${url.host} sent a response head of more than ${HEAD_LIMIT} bytes`), { code: 'HPE_HEADER_OVERFLOW' }))
        return true
      }
      const head = parseHead(piece!.toString('latin1', 0, at))
      if (!head) {
        fail(Object.assign(new Error(`${url.host} sent a malformed response`), { code: 'HPE_INVALID_CONSTANT' }))
        return false
      }
      const encoding = head.headers['transfer-encoding']
      const length = head.headers['content-length']
      if (head.status < 200 || (encoding !== undefined && encoding !== 'identity') || Array.isArray(length)) {
        log('%s answered %d in a form not read directly; sending again', url.pathname, head.status)
        finished = true
        settled = true
        cleanup()
        socket.destroy()
        resolve(undefined)
        return false
      }
      if (length !== undefined && !/^\d+$/.test(length)) {
        fail(Object.assign(new Error(`${url.host} sent Content-Length ${JSON.stringify(length)}`), { code: 'HPE_INVALID_CONTENT_LENGTH' }))
        return false
      }
      inHead = false
      remaining = length === undefined ? -1 : Number(length)
      res.statusCode = head.status
      res.headers = head.headers
      const body = at + CRLFCRLF.length
      piece!.copyWithin(0, body, filled)
      filled -= body
      if (remaining >= 0 && filled > remaining) filled = remaining
      if (remaining >= 0) remaining -= filled
      settled = true
      resolve(res)
      if (remaining === 0) end()
      return true
    }

    const onread = {
      buffer: (): Uint8Array => {
        if (finished) return SCRATCH
        piece ??= allocate(DIRECT_BUFFER_BYTES)
        if (piece.length < DIRECT_BUFFER_BYTES) throw new Error(`allocate gave ${piece.length} bytes, not ${DIRECT_BUFFER_BYTES}`)
        const room = DIRECT_BUFFER_BYTES - filled
        return piece.subarray(filled, filled + (remaining >= 0 && !inHead ? Math.min(room, remaining) : room))
      },
      callback: (n: number): boolean => {
        if (finished) return true
        filled += n
        if (inHead) {
          // false: the answer was given up (or failed) and the connection closed
          if (!onHead()) return false
          if (finished) return true
        } else if (remaining >= 0) {
          remaining -= n
          if (remaining === 0) {
            end()
            return true
          }
        }
        if (filled >= DIRECT_PIECE_BYTES && !giveOn()) {
          paused = true
          return false
        }
        return true
      },
    }

    let socket: Socket | TLSSocket
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1')
    if (url.protocol === 'https:') {
      const tls = requireLazily('node:tls') as typeof import('node:tls')
      const net = requireLazily('node:net') as typeof import('node:net')
      socket = tls.connect({
        host,
        port: Number(url.port || 443),
        ...(net.isIP(host) ? {} : { servername: host }),
        secureContext: conn.context,
        rejectUnauthorized: conn.verify,
        ALPNProtocols: ['http/1.1'],
        onread,
      } as import('node:tls').ConnectionOptions)
      socket.once('secureConnect', () => socket.write(request))
    } else {
      const net = requireLazily('node:net') as typeof import('node:net')
      socket = net.connect({ host, port: Number(url.port || 80), onread })
      socket.once('connect', () => socket.write(request))
    }
    socket.setNoDelay(true)
    socket.setTimeout(conn.idleTimeout, () => fail(Object.assign(new Error(`${url.host} sent nothing for ${conn.idleTimeout / 1000} s`), { code: 'ETIMEDOUT' })))
    socket.on('error', (err) => fail(err))
    socket.on('close', () => {
      if (finished) return
      if (!inHead && remaining < 0) return end() // delimited by the end of the connection
      const got = inHead ? 'before its answer' : `with ${remaining} bytes of the body still to come`
      fail(Object.assign(new Error(`${url.host} closed the connection ${got}`), { code: 'ECONNRESET' }))
    })
    res.attach(
      () => {
        if (!paused || finished) return
        paused = false
        socket.resume()
      },
      (err) => {
        if (finished) return
        finished = true
        cleanup()
        socket.destroy(err ?? undefined)
      },
    )
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** The request's head: `GET`, the target, `host`, the given headers, `connection: close`. */
function requestHead(url: URL, headers: Record<string, string>): string {
  let head = `GET ${url.pathname}${url.search} HTTP/1.1\r\nhost: ${url.host}\r\n`
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase()
    if (lower === 'host' || lower === 'connection') continue
    // what Node's client refuses too: a header that would split the request
    if (!/^[!#$%&'*+.^`|~\w-]+$/.test(name) || /[\r\n\0]/.test(value)) {
      throw Object.assign(new TypeError(`invalid header ${JSON.stringify(name)}`), { code: 'ERR_INVALID_CHAR' })
    }
    head += `${name}: ${value}\r\n`
  }
  return `${head}connection: close\r\n\r\n`
}

/** Parses a response head; undefined when it is not HTTP/1.x. */
export function parseHead(text: string): { status: number; headers: Record<string, string | string[] | undefined> } | undefined {
  const lines = text.split('\r\n')
  const status = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(lines[0])
  if (!status) return undefined
  const headers: Record<string, string | string[] | undefined> = {}
  for (let i = 1; i < lines.length; i++) {
    const colon = lines[i].indexOf(':')
    if (colon <= 0) return undefined
    const name = lines[i].slice(0, colon).trim().toLowerCase()
    const value = lines[i].slice(colon + 1).trim()
    const had = headers[name]
    if (name === 'set-cookie') headers[name] = [...((had as string[] | undefined) ?? []), value]
    else if (name === 'content-length') {
      // the same length twice is one length; two different ones are refused by the reader
      if (had === undefined || had === value) headers[name] = value
      else headers[name] = [...(Array.isArray(had) ? had : [had]), value]
    } else headers[name] = had === undefined ? value : `${had as string}, ${value}`
  }
  return { status: Number(status[1]), headers }
}
