import debug from 'debug'
import type { Agent, Dispatcher } from 'undici'
import type { RegistryOptions } from '../types.js'
import { Authenticator, parseChallenges } from './auth.js'
import { type CredentialOptions, findCredentials } from './credentials.js'
import { RegistryError, type RegistryErrorKind, parseErrorBody } from './errors.js'
import { type RetryPolicy, parseRetryAfter, untilAborted, withRetry } from './retry.js'

const log = debug('blobcache:registry:client')

/** Options of {@link RegistryClient}: the public registry options plus test and tuning knobs. */
export interface ClientOptions extends RegistryOptions {
  /** Environment for auth-file and credential-helper lookup. Default `process.env`. */
  env?: NodeJS.ProcessEnv
  /** Retry policy for transient failures. Defaults: see {@link RetryPolicy}. */
  retry?: RetryPolicy
}

/** A registry answer whose body the caller MUST consume or dump. */
export interface RegistryResponse {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: Dispatcher.ResponseData['body']
  /** The URL that answered (after redirects). */
  url: URL
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
  /** A replayable body, whole or in pieces; requests with a body are retried like any other. */
  body?: Buffer | Buffer[]
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
}

const MAX_REDIRECTS = 5
/** Longest a single `/v2/` ping may take, in ms. */
const PING_TIMEOUT = 30_000
const ERROR_BODY_LIMIT = 64 << 10
const agents = new Map<boolean, Agent>()
let undici: Promise<typeof import('undici')> | undefined

/**
 * undici, loaded on first use: it takes longer to load than the rest of blobcache together, and
 * only registry work needs it.
 */
function http(): Promise<typeof import('undici')> {
  undici ??= import('undici')
  return undici
}

/** Sends one request through the process-wide pool for verified (true) or unverified (false) TLS. */
async function request(url: URL, opts: Omit<Dispatcher.RequestOptions, 'origin' | 'path' | 'method'> & { method: Dispatcher.HttpMethod }, tlsVerify: boolean): Promise<Dispatcher.ResponseData> {
  const { Agent, request: send } = await http()
  let agent = agents.get(tlsVerify)
  if (!agent) {
    agent = new Agent({ connect: { rejectUnauthorized: tlsVerify }, keepAliveTimeout: 30_000 })
    agents.set(tlsVerify, agent)
  }
  return send(url, { ...opts, dispatcher: agent })
}

/** The host to talk to for a registry name: Docker Hub's API lives at `registry-1.docker.io`. */
export function registryHost(registry: string): string {
  return registry === 'docker.io' ? 'registry-1.docker.io' : registry
}

/**
 * An HTTP client for one registry (OCI distribution API): finds the scheme with a `/v2/` ping
 * (https; plain http only when `tlsVerify` is false), authenticates per scope, follows
 * redirects by hand, retries transient failures and turns error answers into
 * {@link RegistryError}s. One HTTP stack (undici) is used throughout.
 */
export class RegistryClient {
  /** The registry as named in references (`docker.io`, `127.0.0.1:5000`). */
  readonly registry: string
  readonly host: string
  readonly tlsVerify: boolean
  readonly #retry: RetryPolicy
  readonly #auth: Authenticator
  #base: Promise<URL> | undefined

  constructor(registry: string, opts: ClientOptions = {}) {
    this.registry = registry
    this.host = registryHost(registry)
    this.tlsVerify = opts.tlsVerify ?? true
    this.#retry = opts.retry ?? {}
    const lookup: CredentialOptions = { credentials: opts.credentials, authFile: opts.authFile, env: opts.env }
    this.#auth = new Authenticator({
      registry,
      credentials: () => findCredentials(registry, undefined, lookup),
      fetchToken: async (url, init) => {
        try {
          const res = await request(url, { ...init, headers: this.#headers(init.headers) }, this.tlsVerify)
          return { status: res.statusCode, headers: res.headers, text: await readLimited(res.body, 1 << 20) }
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
    if (!this.#base) {
      const ping = withRetry(() => this.#ping(AbortSignal.timeout(PING_TIMEOUT)), { ...this.#retry, what: `ping ${this.host}` })
      ping.catch(() => {
        if (this.#base === ping) this.#base = undefined
      })
      this.#base = ping
    }
    return signal ? untilAborted(this.#base, signal) : this.#base
  }

  async #ping(signal: AbortSignal): Promise<URL> {
    const schemes = this.tlsVerify ? ['https'] : ['https', 'http']
    let last: unknown
    for (const scheme of schemes) {
      const url = new URL(`${scheme}://${this.host}/v2/`)
      let res: Dispatcher.ResponseData
      try {
        res = await request(url, { method: 'GET', headers: this.#headers(), signal }, this.tlsVerify)
      } catch (err) {
        log('ping %s failed: %s', url.href, (err as Error).message)
        last = err
        continue
      }
      const text = await readLimited(res.body, ERROR_BODY_LIMIT)
      if (res.statusCode === 200 || res.statusCode === 401) {
        if (res.statusCode === 401) this.#auth.setChallenge(res.headers['www-authenticate'])
        log('%s is at %s (%s)', this.registry, url.origin, this.#auth.challenge?.scheme ?? 'no auth')
        return new URL('/', url)
      }
      throw this.#error({ method: 'GET', path: url, repository: '', scopes: [], kind: 'ping', action: 'pinging the registry' }, res.statusCode, res.headers, text)
    }
    throw new RegistryError({ status: 0, registry: this.registry, repository: '', action: `pinging the registry over ${schemes.join(' and ')}`, kind: 'ping', cause: last })
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
      if (Array.isArray(body)) headers['content-length'] = String(body.reduce((n, b) => n + b.length, 0))
      if (sameHost) {
        const authorization = await this.#auth.authorization(scopes, req.signal)
        if (authorization) headers.authorization = authorization
      }
      let res: Dispatcher.ResponseData
      try {
        // undici sends an Iterable body as documented (its typings omit it), with our content-length
        res = await request(url, { method, headers, body: body as Buffer | undefined, signal: req.signal }, this.tlsVerify)
      } catch (err) {
        if (req.signal?.aborted) throw req.signal.reason
        throw new RegistryError({ status: 0, registry: this.registry, repository: req.repository, action: req.action, kind: req.kind, cause: err })
      }
      const status = res.statusCode
      if (status === 401 && sameHost && authAttempts++ === 0) {
        const text = await readLimited(res.body, ERROR_BODY_LIMIT)
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
        await res.body.dump()
        if (++redirects > MAX_REDIRECTS) throw this.#error(req, status, res.headers, '', `${req.action}: too many redirects`)
        url = new URL(location, url)
        if (status === 303) method = method === 'HEAD' ? 'HEAD' : 'GET'
        if (method === 'GET' || method === 'HEAD') body = undefined
        log('redirected to %s', url.host === base.host ? url.pathname : url.origin)
        continue
      }
      if (req.ok ? req.ok.includes(status) : status >= 200 && status < 300) {
        return { status, headers: res.headers, body: res.body, url }
      }
      const text = method === 'HEAD' ? '' : await readLimited(res.body, ERROR_BODY_LIMIT).catch(() => '')
      if (method === 'HEAD') await res.body.dump().catch(() => {})
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

/** Reads a body as text, at most `limit` bytes (the rest is discarded). */
export async function readLimited(body: Dispatcher.ResponseData['body'], limit: number): Promise<string> {
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
export async function readBuffer(body: Dispatcher.ResponseData['body'], limit: number, fail: () => Error): Promise<Buffer> {
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
