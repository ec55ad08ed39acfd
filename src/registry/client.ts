import type { Agent, IncomingMessage } from 'node:http'
import type { SecureContext } from 'node:tls'
import type { Readable } from 'node:stream'
import debug from 'debug'
import type { RegistryOptions } from '../types.js'
import { Authenticator, parseChallenges } from './auth.js'
import type { BodySink } from './chunks.js'
import { type CredentialOptions, findCredentials } from './credentials.js'
import { RegistryError, type RegistryErrorKind, parseErrorBody } from './errors.js'
import { type RetryPolicy, parseRetryAfter, untilAborted, withRetry } from './retry.js'
import { requireLazily } from '../lazy-require.js'
import { findCertDir, readCertDir } from './certs.js'
import { type ProxyConfig, isLoopbackHost, proxyAuthorization, proxyConfig, proxyFor } from './proxy.js'
import { secureContextFor } from './trust.js'
import { type DirectResponse, directGet } from './direct-get.js'

const log = debug('blobcache:registry:client')

/** Options of {@link RegistryClient}: the public registry options plus test and tuning knobs. */
export interface ClientOptions extends RegistryOptions {
  /** Environment for auth-file and credential-helper lookup. Default `process.env`. */
  env?: NodeJS.ProcessEnv
  /** Retry policy for transient failures. Defaults: see {@link RetryPolicy}. */
  retry?: RetryPolicy
  /** How long one `/v2/` ping may take, in ms. Default 30 000. */
  pingTimeout?: number
  /** System-wide places of per-host certificates directories. Default `/etc/containers/certs.d`, `/etc/docker/certs.d`. */
  systemCertDirs?: string[]
}

/** A response body: a Node stream the caller MUST read to its end, {@link discard}, or destroy. */
export type ResponseBody = Readable

/** A registry answer whose body the caller MUST consume, discard or destroy. */
export interface RegistryResponse {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: ResponseBody
  /** The URL that answered (after redirects). */
  url: URL
}

/**
 * A request body: bytes given whole or in pieces (replayable, so retried like any other
 * request), or a {@link StreamedBody} that is written as its bytes arrive.
 */
export type RequestBody = Buffer | Buffer[] | StreamedBody

/**
 * A body of a known length written by `write` as its bytes become available (an upload chunk
 * still being read). `write` MUST write exactly `length` bytes to `out` and resolve when done,
 * or reject (the request is then destroyed). It is called again for each new attempt (a
 * redirect or retry) and MUST then write the same bytes again.
 */
export interface StreamedBody {
  length: number
  write(out: BodySink): Promise<void>
}

/** One request to a registry. */
export interface RegistryRequest {
  method: 'GET' | 'HEAD' | 'PUT' | 'POST' | 'PATCH' | 'DELETE'
  /** Path under the registry (`/v2/…`) or an absolute URL (upload locations, `Link` pages). */
  path: string | URL
  repository: string
  /** Token scopes the request needs, e.g. `repository:foo:pull`. */
  scopes: string[]
  headers?: Record<string, string>
  /** The body; whole or in pieces it is replayed by retries and redirects. */
  body?: RequestBody
  /** Statuses that count as success. Default: any 2xx. */
  ok?: number[]
  kind: RegistryErrorKind
  /** What is being done, for errors: `fetching manifest latest`. */
  action: string
  signal?: AbortSignal
  /** Follow redirects (Authorization is dropped when the host changes). Default true. */
  followRedirects?: boolean
  /** Retry transient failures. Default true. */
  retry?: boolean
  /**
   * GET only: read the body straight from the socket into buffers of `allocate` (default new
   * ones), passed on in pieces of about 1 MiB, instead of through Node's HTTP client (see
   * direct-get.ts). Not through a proxy; an answer in a form it does not read is asked again the
   * usual way.
   */
  direct?: { allocate?: (length: number) => Buffer }
}

const MAX_REDIRECTS = 5
/** Longest a single `/v2/` ping may take, in ms. */
const PING_TIMEOUT = 30_000
/** Longest a connection may stay silent while a request waits for (or reads) its answer, in ms. */
const IDLE_TIMEOUT = 300_000
const ERROR_BODY_LIMIT = 64 << 10

/** A `/v2/` answer: where it came from, and its body (read up to {@link ERROR_BODY_LIMIT}). */
interface PingAnswer {
  url: URL
  res: IncomingMessage
  text: string
}

/** The statuses a registry answers `/v2/` with: 200, or 401 with a challenge. */
const isRegistryAnswer = (status: number | undefined) => status === 200 || status === 401

/** Most bytes {@link discard} reads to keep a connection; a longer rest closes it instead. */
const DISCARD_LIMIT = 256 << 10

type HttpModule = typeof import('node:http') | typeof import('node:https')
const modules = new Map<string, Promise<HttpModule>>()
const agents = new Map<string, Agent>()
/** Secure contexts by {@link TlsProfile} key: one with a few hundred authorities takes tens of ms to build. */
const contexts = new Map<string, SecureContext | undefined>()

/**
 * Node's own HTTP stack (`node:http`, `node:https`), loaded on first use: native llhttp, no
 * WebAssembly to compile and nothing to load from node_modules, so a short registry command
 * starts and exits quickly. Measured against undici 7 on 4 x 41 MiB local downloads it took
 * about half the CPU time.
 */
function httpModule(protocol: string): Promise<HttpModule> {
  let mod = modules.get(protocol)
  if (!mod) {
    // required, not imported: a dynamic import() cannot run in the CLI's startup snapshot
    mod = Promise.resolve(requireLazily(protocol === 'https:' ? 'node:https' : 'node:http') as HttpModule)
    modules.set(protocol, mod)
  }
  return mod
}

/**
 * How a client speaks TLS: whether it verifies servers and the secure context it uses (see
 * trust.ts), and the proxies of its environment (proxy.ts). `key` names the keep-alive pool:
 * clients with the same settings share one.
 */
interface TlsProfile {
  verify: boolean
  key: string
  context: SecureContext | undefined
  proxies: ProxyConfig
}

/** The process-wide keep-alive pool named `key`, made by `make` the first time. */
function pooled(key: string, make: () => Agent): Agent {
  let agent = agents.get(key)
  if (!agent) {
    agent = make()
    agents.set(key, agent)
  }
  return agent
}

/** The pool for a scheme and TLS profile; idle sockets do not hold the process. */
function agentFor(mod: HttpModule, protocol: string, tls: TlsProfile): Agent {
  if (protocol !== 'https:') return pooled(protocol, () => new mod.Agent({ keepAlive: true }))
  return pooled(`https:${tls.key}`, () => new (mod as typeof import('node:https')).Agent({ keepAlive: true, rejectUnauthorized: tls.verify, secureContext: tls.context }))
}

/**
 * The pool of https connections tunnelled through `proxy` with CONNECT: TLS runs end to end
 * between us and the registry, over the tunnel, with the client's own trust and certificate.
 */
function tunnelAgentFor(proxy: URL, tls: TlsProfile): Agent {
  return pooled(`tunnel:${proxy.href}|${tls.key}`, () => {
    const https = requireLazily('node:https') as typeof import('node:https')
    const tlsModule = requireLazily('node:tls') as typeof import('node:tls')
    const viaTls = proxy.protocol === 'https:'
    const toProxy = (viaTls ? https : (requireLazily('node:http') as typeof import('node:http'))) as typeof import('node:http')
    const authorization = proxyAuthorization(proxy)
    class TunnelAgent extends https.Agent {
      override createConnection(options: import('node:http').ClientRequestArgs, callback?: (err: Error | null, stream: import('node:stream').Duplex) => void): undefined {
        const done = callback ?? (() => {})
        const target = `${String(options.host)}:${String(options.port)}`
        const headers: Record<string, string> = { host: target }
        if (authorization) headers['proxy-authorization'] = authorization
        const connect = toProxy.request({
          host: proxy.hostname.replace(/^\[(.*)\]$/, '$1'),
          port: proxy.port || (viaTls ? 443 : 80),
          method: 'CONNECT',
          path: target,
          headers,
          agent: false,
          // an https proxy is checked with the client's own TLS settings, as Go's transport does
          ...(viaTls ? { secureContext: tls.context, rejectUnauthorized: tls.verify } : {}),
        })
        connect.once('connect', (res, socket, head) => {
          if (res.statusCode !== 200) {
            socket.destroy()
            done(Object.assign(new Error(`proxy ${proxy.host} answered HTTP ${res.statusCode} to CONNECT ${target}`), { code: 'EPROXY' }), socket)
            return
          }
          if (head.length > 0) socket.unshift(head)
          done(null, tlsModule.connect({ ...options, socket } as import('node:tls').ConnectionOptions))
        })
        connect.once('error', (err) => done(err, undefined as unknown as import('node:stream').Duplex))
        // a tunnel not set up in time fails (not a socket timeout: the socket lives on in the pool)
        const timer = setTimeout(() => {
          connect.destroy(Object.assign(new Error(`proxy ${proxy.host} sent nothing for ${IDLE_TIMEOUT / 1000} s`), { code: 'ETIMEDOUT' }))
        }, IDLE_TIMEOUT)
        timer.unref()
        connect.once('close', () => clearTimeout(timer))
        connect.once('connect', () => clearTimeout(timer))
        connect.end()
        return undefined
      }
    }
    return new TunnelAgent({ keepAlive: true, rejectUnauthorized: tls.verify, secureContext: tls.context })
  })
}

/** The pool of plain-HTTP requests sent to `proxy` in absolute form (an https proxy checked with the client's TLS settings). */
function proxyAgentFor(proxy: URL, tls: TlsProfile): Agent {
  return pooled(`proxy:${proxy.href}|${tls.key}`, () =>
    proxy.protocol === 'https:'
      ? new (requireLazily('node:https') as typeof import('node:https')).Agent({ keepAlive: true, secureContext: tls.context, rejectUnauthorized: tls.verify })
      : new (requireLazily('node:http') as typeof import('node:http')).Agent({ keepAlive: true }),
  )
}

interface ExchangeInit {
  method: string
  headers: Record<string, string>
  body?: RequestBody | string
  signal?: AbortSignal
}

/**
 * Sends one request and resolves its answer once the headers are in (body unread). A
 * connection silent for {@link IDLE_TIMEOUT} fails with `ETIMEDOUT`; an abort destroys the
 * request (and its body stream) and rejects.
 */
async function exchange(url: URL, init: ExchangeInit, tls: TlsProfile): Promise<IncomingMessage> {
  const proxy = proxyFor(url, tls.proxies)
  const { body } = init
  const headers = { ...init.headers }
  if (Array.isArray(body)) headers['content-length'] = String(body.reduce((n, b) => n + b.length, 0))
  else if (body !== undefined && typeof body === 'object' && !Buffer.isBuffer(body)) headers['content-length'] = String(body.length)
  let send: (options: import('node:http').RequestOptions) => import('node:http').ClientRequest
  if (proxy && url.protocol === 'http:') {
    // plain HTTP through the proxy: the whole URL as the request target
    const mod = await httpModule(proxy.protocol)
    const authorization = proxyAuthorization(proxy)
    headers.host = url.host
    if (authorization) headers['proxy-authorization'] = authorization
    const agent = proxyAgentFor(proxy, tls)
    const target = { host: proxy.hostname.replace(/^\[(.*)\]$/, '$1'), port: proxy.port || (proxy.protocol === 'https:' ? 443 : 80), path: url.href }
    send = (options) => mod.request({ ...options, ...target, agent })
  } else {
    const mod = await httpModule(url.protocol)
    const agent = proxy ? tunnelAgentFor(proxy, tls) : agentFor(mod, url.protocol, tls)
    send = (options) => mod.request(url, { ...options, agent })
  }
  return new Promise<IncomingMessage>((resolve, reject) => {
    const req = send({ method: init.method, headers, signal: init.signal, timeout: IDLE_TIMEOUT })
    req.on('response', resolve)
    req.on('error', reject)
    req.on('timeout', () => {
      const err = Object.assign(new Error(`${url.host} sent nothing for ${IDLE_TIMEOUT / 1000} s`), { code: 'ETIMEDOUT' })
      req.destroy(err)
    })
    if (body === undefined || typeof body === 'string' || Buffer.isBuffer(body)) {
      req.end(body)
    } else if (Array.isArray(body)) {
      req.cork()
      for (const part of body) req.write(part)
      req.end()
      req.uncork()
    } else {
      body.write(req).then(
        () => req.end(),
        (err: Error) => req.destroy(err),
      )
    }
  })
}

/** The host to talk to for a registry name: Docker Hub's API lives at `registry-1.docker.io`. */
export function registryHost(registry: string): string {
  return registry === 'docker.io' ? 'registry-1.docker.io' : registry
}

/**
 * An HTTP client for one registry (OCI distribution API): finds the scheme with a `/v2/` ping
 * (https; plain http only when `tlsVerify` is false), authenticates per scope, follows
 * redirects by hand, retries transient failures and turns error answers into
 * {@link RegistryError}s. Requests go through Node's HTTP client, but for the bodies of large
 * blobs, which are read straight from a socket of their own (direct-get.ts).
 */
export class RegistryClient {
  /** The registry as named in references (`docker.io`, `127.0.0.1:5000`). */
  readonly registry: string
  readonly host: string
  readonly tlsVerify: boolean
  readonly #retry: RetryPolicy
  readonly #pingTimeout: number
  readonly #auth: Authenticator
  #base: Promise<URL> | undefined
  /** Aborts the ping started by warmUp(), until a request uses it. */
  #speculative: AbortController | undefined
  readonly #certDir: string | undefined
  readonly #env: NodeJS.ProcessEnv | undefined
  readonly #systemCertDirs: string[] | undefined
  #tlsProfile: Promise<TlsProfile> | undefined

  constructor(registry: string, opts: ClientOptions = {}) {
    this.registry = registry
    this.host = registryHost(registry)
    this.tlsVerify = opts.tlsVerify ?? true
    this.#retry = opts.retry ?? {}
    this.#pingTimeout = opts.pingTimeout ?? PING_TIMEOUT
    this.#certDir = opts.certDir
    this.#env = opts.env
    this.#systemCertDirs = opts.systemCertDirs
    const lookup: CredentialOptions = { credentials: opts.credentials, authFile: opts.authFile, env: opts.env }
    this.#auth = new Authenticator({
      registry,
      credentials: () => (opts.anonymous ? Promise.resolve(undefined) : findCredentials(registry, undefined, lookup)),
      registryToken: opts.registryToken,
      fetchToken: async (url, init) => {
        try {
          const res = await exchange(url, { ...init, headers: this.#headers(init.headers) }, await this.#tls())
          return { status: res.statusCode ?? 0, headers: res.headers, text: await readLimited(res, 1 << 20) }
        } catch (cause) {
          throw new RegistryError({ status: 0, registry, repository: '', action: `getting a token from ${url.origin}${url.pathname}`, kind: 'token', cause })
        }
      },
    })
  }

  /** The retry policy in force (for callers that retry whole operations). */
  get retryPolicy(): RetryPolicy {
    return this.#retry
  }

  /**
   * The base URL (`https://host/`), found by pinging `/v2/` once and shared by every request.
   * The ping is not tied to one caller's signal; an abort only stops waiting for it.
   */
  base(signal?: AbortSignal): Promise<URL> {
    this.#speculative = undefined
    return this.#startPing(signal)
  }

  #startPing(signal?: AbortSignal): Promise<URL> {
    if (!this.#base) {
      const early = this.#speculative
      const pingSignal = early ? AbortSignal.any([AbortSignal.timeout(this.#pingTimeout), early.signal]) : undefined
      const ping = withRetry(() => this.#ping(pingSignal ?? AbortSignal.timeout(this.#pingTimeout)), {
        ...this.#retry,
        signal: early?.signal,
        what: `ping ${this.host}`,
      })
      ping.catch(() => {
        if (this.#base === ping) this.#base = undefined
      })
      this.#base = ping
    }
    return signal ? untilAborted(this.#base, signal) : this.#base
  }

  /**
   * Starts the `/v2/` ping now, before any request needs it, so that it runs while the caller
   * still reads its source (a copy's destination does). Its failure is kept for the first
   * request, which retries it. {@link abandonWarmUp} stops it if no request has used it yet.
   */
  warmUp(): void {
    if (this.#base) return
    this.#speculative = new AbortController()
    this.#startPing().catch(() => {})
  }

  /** Stops a ping started by {@link warmUp} that no request has waited for (the process need not wait for it). */
  abandonWarmUp(): void {
    const early = this.#speculative
    this.#speculative = undefined
    early?.abort(new Error('the registry ping was not needed'))
  }

  /**
   * The client's TLS profile, settled once: its certificates directory (`certDir`, else the
   * per-host places of certs.ts) read and turned into a secure context. Fails
   * `CERT_DIR_INVALID` (never retried) when that directory cannot be used.
   */
  #tls(): Promise<TlsProfile> {
    this.#tlsProfile ??= (async () => {
      const dir = await findCertDir(this.registry, { certDir: this.#certDir, env: this.#env, systemDirs: this.#systemCertDirs })
      const certs = dir === undefined ? undefined : await readCertDir(dir)
      const own = certs !== undefined && (certs.authorities.length > 0 || certs.client !== undefined)
      const key = own ? `${this.tlsVerify}:${certs.dir}` : String(this.tlsVerify)
      const verify = this.tlsVerify
      return {
        verify,
        key,
        // one context per setting and directory in the process, like the pool it goes with;
        // made when a TLS connection first needs it (a plain-HTTP registry never does)
        get context() {
          if (!contexts.has(key)) contexts.set(key, secureContextFor(verify, certs))
          return contexts.get(key)
        },
        proxies: proxyConfig(this.#env ?? process.env),
      }
    })()
    return this.#tlsProfile
  }

  async #ping(signal: AbortSignal): Promise<URL> {
    const schemes = this.tlsVerify ? ['https'] : ['https', 'http']
    const profile = await this.#tls()
    const attempt = async (scheme: string): Promise<PingAnswer> => {
      const url = new URL(`${scheme}://${this.host}/v2/`)
      const res = await exchange(url, { method: 'GET', headers: this.#headers(), signal }, profile)
      return { url, res, text: await readLimited(res, ERROR_BODY_LIMIT) }
    }
    const failed = (scheme: string, err: unknown) => log('ping %s://%s/v2/ failed: %s', scheme, this.host, (err as Error).message)
    const unreachable = (cause: unknown) =>
      new RegistryError({ status: 0, registry: this.registry, repository: '', action: `pinging the registry over ${schemes.join(' and ')}`, kind: 'ping', cause })
    // The plain-HTTP answer, used only when HTTPS gives none.
    let plain: Promise<PingAnswer> | undefined
    if (!this.tlsVerify && isLoopbackHost(new URL(`http://${this.host}`).hostname)) {
      // On this machine's loopback, TLS that is not verified protects nothing (no wire, and no
      // one to trust), so plain HTTP is asked first, and HTTPS only when that gives no
      // registry's answer: a plain-HTTP registry then never costs a TLS module, context and
      // handshake (about 8 ms of a re-push). Docker also takes loopback registries as insecure.
      try {
        const first = await attempt('http')
        if (isRegistryAnswer(first.res.statusCode)) return this.#pinged(first)
        plain = Promise.resolve(first)
      } catch (err) {
        failed('http', err)
        if (signal.aborted) throw unreachable(err)
      }
    } else if (schemes.length > 1) {
      // Elsewhere, without TLS verification, plain HTTP is asked at the same time (a ping
      // carries no credentials): HTTPS still wins. The plain request is sent first: it is cheap
      // to set up, while the TLS one is (module, context, socket) a few ms of work that its
      // answer then has to wait for anyway.
      plain = attempt('http')
      plain.catch(() => {})
    }
    let tls: PingAnswer
    try {
      tls = await attempt('https')
    } catch (err) {
      failed('https', err)
      if (!plain) throw unreachable(err)
      let answer: PingAnswer
      try {
        answer = await plain
      } catch (err2) {
        failed('http', err2)
        throw unreachable(err2)
      }
      return this.#pinged(answer)
    }
    return this.#pinged(tls)
  }

  /** The base URL from a `/v2/` answer: 200, or 401 with the challenge kept; any other is an error. */
  #pinged({ url, res, text }: PingAnswer): URL {
    if (isRegistryAnswer(res.statusCode)) {
      if (res.statusCode === 401) this.#auth.setChallenge(res.headers['www-authenticate'])
      log('%s is at %s (%s)', this.registry, url.origin, this.#auth.challenge?.scheme ?? 'no auth')
      return new URL('/', url)
    }
    throw this.#error({ method: 'GET', path: url, repository: '', scopes: [], kind: 'ping', action: 'pinging the registry' }, res.statusCode ?? 0, res.headers, text)
  }

  /**
   * Sends a request and resolves the successful answer (body unread). Error answers reject
   * with {@link RegistryError}; transient ones (5xx, 429, resets) are retried first unless
   * `retry` is false; a 401 fetches fresh credentials once. Aborting rejects with `signal.reason`.
   */
  send(req: RegistryRequest): Promise<RegistryResponse> {
    const once = () => this.#sendOnce(req)
    if (req.retry === false) return once()
    return withRetry(once, { ...this.#retry, signal: req.signal, what: `${req.action} (${this.registry}/${req.repository})` })
  }

  async #sendOnce(req: RegistryRequest): Promise<RegistryResponse> {
    const base = await this.base(req.signal)
    let url = typeof req.path === 'string' ? new URL(req.path, base) : req.path
    let method = req.method
    let body = req.body
    let scopes = req.scopes
    let authAttempts = 0
    for (let redirects = 0; ; ) {
      const sameHost = url.host === base.host
      const headers = this.#headers(req.headers)
      if (sameHost) {
        const authorization = await this.#auth.authorization(scopes, req.signal)
        if (authorization) headers.authorization = authorization
      }
      let res: IncomingMessage | DirectResponse
      try {
        const tls = await this.#tls()
        const direct = req.direct && method === 'GET' && body === undefined && !proxyFor(url, tls.proxies)
          ? await directGet(url, { headers, signal: req.signal, allocate: req.direct.allocate }, { verify: tls.verify, context: url.protocol === 'https:' ? tls.context : undefined, idleTimeout: IDLE_TIMEOUT })
          : undefined
        res = direct ?? (await exchange(url, { method, headers, body, signal: req.signal }, tls))
      } catch (err) {
        if (req.signal?.aborted) throw req.signal.reason
        throw new RegistryError({ status: 0, registry: this.registry, repository: req.repository, action: req.action, kind: req.kind, cause: err })
      }
      const status = res.statusCode ?? 0
      if (status === 401 && sameHost && authAttempts++ === 0) {
        const text = await readLimited(res, ERROR_BODY_LIMIT)
        const challenge = this.#auth.setChallenge(res.headers['www-authenticate'])
        if (challenge) {
          // a Bearer challenge names the scope it wants; ask for it along with ours
          const wanted = challenge.scheme === 'bearer' ? (challenge.params.scope ?? '').split(' ').filter(Boolean) : []
          scopes = [...new Set([...scopes, ...wanted])]
          log('401 for %s, renewing credentials for %s', req.action, scopes.join(' ') || 'no scope')
          this.#auth.invalidate(scopes)
          continue
        }
        throw this.#error(req, status, res.headers, text)
      }
      const location = res.headers.location
      if (status >= 300 && status < 400 && typeof location === 'string' && req.followRedirects !== false) {
        await discard(res)
        if (++redirects > MAX_REDIRECTS) throw this.#error(req, status, res.headers, '', `${req.action}: too many redirects`)
        url = new URL(location, url)
        if (status === 303) method = method === 'HEAD' ? 'HEAD' : 'GET'
        if (method === 'GET' || method === 'HEAD') body = undefined
        log('redirected to %s', url.host === base.host ? url.pathname : url.origin)
        continue
      }
      if (req.ok ? req.ok.includes(status) : status >= 200 && status < 300) {
        return { status, headers: res.headers, body: res, url }
      }
      const text = method === 'HEAD' ? '' : await readLimited(res, ERROR_BODY_LIMIT).catch(() => '')
      if (method === 'HEAD') await discard(res)
      throw this.#error(req, status, res.headers, text)
    }
  }

  #error(req: RegistryRequest, status: number, headers: RegistryResponse['headers'], text: string, action = req.action): RegistryError {
    const errors = parseErrorBody(text)
    const init = { status, registry: this.registry, repository: req.repository, action, kind: req.kind, errors, retryAfter: parseRetryAfter(headers['retry-after']) }
    if (status === 401) {
      const challenge = parseChallenges(headers['www-authenticate']).find((c) => c.params.error)
      if (challenge?.params.error === 'insufficient_scope') return new RegistryError(init, 'DENIED')
      return new RegistryError(init, errors[0]?.code === 'DENIED' ? 'DENIED' : 'UNAUTHORIZED')
    }
    return new RegistryError(init)
  }

  #headers(extra?: Record<string, string>): Record<string, string> {
    return { 'user-agent': 'blobcache/0.1', ...extra }
  }
}

/**
 * Reads and drops the rest of a body so that its connection can serve the next request; a
 * rest longer than {@link DISCARD_LIMIT} closes the connection instead. Never rejects.
 */
export function discard(body: Readable): Promise<void> {
  return new Promise<void>((resolve) => {
    if (body.readableEnded || body.destroyed) return resolve()
    let n = 0
    body.on('data', (chunk: Buffer) => {
      n += chunk.length
      if (n > DISCARD_LIMIT) body.destroy()
    })
    body.once('end', resolve)
    body.once('close', resolve)
    body.on('error', () => resolve())
    body.resume()
  })
}

/** Reads a body as text, at most `limit` bytes (the rest is discarded). */
export async function readLimited(body: Readable, limit: number): Promise<string> {
  const chunks: Buffer[] = []
  let n = 0
  for await (const chunk of body as AsyncIterable<Buffer>) {
    if (n < limit) chunks.push(chunk.subarray(0, limit - n))
    n += chunk.length
  }
  return Buffer.concat(chunks).toString('utf8')
}

/**
 * Reads a whole body into a Buffer, failing with `what` when it exceeds `limit` bytes (the
 * request is then abandoned).
 */
export async function readBuffer(body: Readable, limit: number, fail: () => Error): Promise<Buffer> {
  const chunks: Buffer[] = []
  let n = 0
  for await (const chunk of body as AsyncIterable<Buffer>) {
    n += chunk.length
    if (n > limit) {
      body.destroy()
      throw fail()
    }
    chunks.push(chunk)
  }
  return Buffer.concat(chunks)
}

/** A header's single value. */
export function header(res: { headers: RegistryResponse['headers'] }, name: string): string | undefined {
  const v = res.headers[name]
  return Array.isArray(v) ? v[0] : v
}
