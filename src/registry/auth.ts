import debug from 'debug'
import type { Credentials } from './credentials.js'
import { RegistryError, parseErrorBody } from './errors.js'
import { untilAborted } from './retry.js'

const log = debug('blobcache:registry:auth')

/** One `WWW-Authenticate` challenge: the scheme in lowercase and its parameters. */
export interface Challenge {
  scheme: string
  params: Record<string, string>
}

/** Longest a token request may take, in ms. */
const TOKEN_TIMEOUT = 60_000
const TOKEN = /[!#$%&'*+\-.^_`|~0-9A-Za-z]+/y
const SPACE = /[ \t]*/y

/**
 * Parses `WWW-Authenticate` header values into challenges, after RFC 7235: several challenges
 * may share one value (`Basic realm="a", Bearer realm="b",service="c"`); parameter names are
 * lowercased and quoted values unescaped. Malformed trailing parts are ignored.
 */
export function parseChallenges(header: string | string[] | undefined): Challenge[] {
  const values = header === undefined ? [] : Array.isArray(header) ? header : [header]
  const out: Challenge[] = []
  for (const value of values) {
    let i = 0
    const skip = (re: RegExp) => {
      re.lastIndex = i
      const m = re.exec(value)
      if (m) i = re.lastIndex
      return m?.[0]
    }
    let current: Challenge | undefined
    while (i < value.length) {
      skip(SPACE)
      if (value[i] === ',') {
        i++
        continue
      }
      const word = skip(TOKEN)
      if (!word) break
      skip(SPACE)
      if (value[i] === '=' && current) {
        i++
        skip(SPACE)
        let v = ''
        if (value[i] === '"') {
          i++
          while (i < value.length && value[i] !== '"') {
            if (value[i] === '\\' && i + 1 < value.length) i++
            v += value[i++]
          }
          i++
        } else {
          v = skip(/[^,\s]*/y) ?? ''
        }
        current.params[word.toLowerCase()] = v
      } else {
        current = { scheme: word.toLowerCase(), params: {} }
        out.push(current)
      }
    }
  }
  return out
}

/** The scope of pull (or pull and push, or delete) access to one repository. */
export function repositoryScope(repository: string, actions: string): string {
  return `repository:${repository}:${actions}`
}

/** A response as the token fetcher reports it. */
export interface TokenResponse {
  status: number
  headers: Record<string, string | string[] | undefined>
  text: string
}

/** Sends one token request; supplied by the client so that one HTTP stack is used. */
export type TokenFetcher = (
  url: URL,
  init: { method: 'GET' | 'POST'; headers: Record<string, string>; body?: string; signal?: AbortSignal },
) => Promise<TokenResponse>

interface CachedToken {
  token: string
  expires: number
}

/** Options of {@link Authenticator}. */
export interface AuthenticatorOptions {
  /** Registry host, for error messages. */
  registry: string
  /** Resolves the credentials to use; called once, lazily. Undefined means anonymous. */
  credentials: () => Promise<Credentials | undefined>
  fetchToken: TokenFetcher
  /** OAuth2 client id sent with identity-token requests. Default `blobcache`. */
  clientId?: string
  /** A bearer token to send as it is to a Bearer challenge, none fetched. */
  registryToken?: string
}

/**
 * Turns a registry's challenge into `Authorization` headers: Basic from credentials, or Bearer
 * tokens fetched from the challenge's realm. Tokens are cached per scope set until shortly
 * before they expire, and concurrent requests for one scope share one token request.
 */
export class Authenticator {
  #challenge: Challenge | undefined
  readonly #tokens = new Map<string, Promise<CachedToken>>()
  #credentials: Promise<Credentials | undefined> | undefined
  readonly #opts: AuthenticatorOptions

  constructor(opts: AuthenticatorOptions) {
    this.#opts = opts
  }

  /** The challenge in force (from the `/v2/` ping or the last 401), if any. */
  get challenge(): Challenge | undefined {
    return this.#challenge
  }

  /** Adopts the first Bearer or Basic challenge of a `WWW-Authenticate` header. */
  setChallenge(header: string | string[] | undefined): Challenge | undefined {
    const all = parseChallenges(header)
    const chosen = all.find((c) => c.scheme === 'bearer') ?? all.find((c) => c.scheme === 'basic')
    if (chosen) this.#challenge = chosen
    return chosen
  }

  /** Forgets the cached token for `scopes`, so that the next request fetches a fresh one. */
  invalidate(scopes: string[]): void {
    this.#tokens.delete(scopeKey(scopes))
  }

  /** The `Authorization` header value for a request needing `scopes`, or undefined for none. */
  async authorization(scopes: string[], signal?: AbortSignal): Promise<string | undefined> {
    const challenge = this.#challenge
    if (!challenge) return undefined
    const creds = await this.#creds()
    if (challenge.scheme === 'basic') {
      if (!creds || !('username' in creds)) return undefined
      return 'Basic ' + Buffer.from(`${creds.username}:${creds.password}`).toString('base64')
    }
    if (challenge.scheme !== 'bearer') return undefined
    if (this.#opts.registryToken) return `Bearer ${this.#opts.registryToken}`
    const key = scopeKey(scopes)
    const wait = (p: Promise<CachedToken>) => (signal ? untilAborted(p, signal) : p)
    const cachedEntry = this.#tokens.get(key)
    if (cachedEntry) {
      const cached = await wait(cachedEntry).catch((err: unknown) => {
        if (signal?.aborted) throw signal.reason
        return undefined // that request failed; ask again below
      })
      if (cached && cached.expires > Date.now()) return `Bearer ${cached.token}`
      if (this.#tokens.get(key) === cachedEntry) this.#tokens.delete(key)
    }
    // shared by every request for these scopes, so not tied to this caller's signal
    const entry = this.#requestToken(challenge, scopes, creds, AbortSignal.timeout(TOKEN_TIMEOUT))
    this.#tokens.set(key, entry)
    entry.catch(() => {
      if (this.#tokens.get(key) === entry) this.#tokens.delete(key)
    })
    return `Bearer ${(await wait(entry)).token}`
  }

  #creds(): Promise<Credentials | undefined> {
    this.#credentials ??= this.#opts.credentials()
    return this.#credentials
  }

  async #requestToken(challenge: Challenge, scopes: string[], creds: Credentials | undefined, signal: AbortSignal): Promise<CachedToken> {
    const realm = challenge.params.realm
    const registry = this.#opts.registry
    const fail = (status: number, msg: string, text = '') =>
      new RegistryError({ status, registry, repository: '', action: `getting a token from ${realm ?? '(no realm)'}: ${msg}`, kind: 'token', errors: parseErrorBody(text) })
    if (!realm) throw fail(401, 'the Bearer challenge has no realm')
    let url: URL
    try {
      url = new URL(realm)
    } catch (cause) {
      throw new RegistryError({ status: 401, registry, repository: '', action: `invalid token realm ${JSON.stringify(realm)}`, kind: 'token', cause })
    }
    const service = challenge.params.service
    let res: TokenResponse
    if (creds && 'identityToken' in creds) {
      const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: creds.identityToken, client_id: this.#opts.clientId ?? 'blobcache' })
      if (service) form.set('service', service)
      if (scopes.length) form.set('scope', scopes.join(' '))
      res = await this.#opts.fetchToken(url, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: form.toString(),
        signal,
      })
    } else {
      if (service) url.searchParams.set('service', service)
      for (const s of scopes) url.searchParams.append('scope', s)
      const headers: Record<string, string> = {}
      if (creds) headers.authorization = 'Basic ' + Buffer.from(`${creds.username}:${creds.password}`).toString('base64')
      res = await this.#opts.fetchToken(url, { method: 'GET', headers, signal })
    }
    if (res.status !== 200) throw fail(res.status, `HTTP ${res.status}`, res.text)
    let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown; issued_at?: unknown }
    try {
      doc = JSON.parse(res.text) as typeof doc
    } catch {
      throw fail(502, 'the answer is not JSON')
    }
    const token = typeof doc.token === 'string' && doc.token ? doc.token : doc.access_token
    if (typeof token !== 'string' || !token) throw fail(502, 'the answer has no token')
    const lifetime = typeof doc.expires_in === 'number' && doc.expires_in > 0 ? doc.expires_in : 60
    const issued = typeof doc.issued_at === 'string' ? Date.parse(doc.issued_at) : NaN
    const start = Number.isNaN(issued) || issued > Date.now() ? Date.now() : issued
    // Renew a little early, but never treat a short-lived token as expired on arrival.
    const expires = start + Math.max(lifetime - 10, lifetime / 2) * 1000
    log('token for %s (%s), %d s', registry, scopes.join(' ') || 'no scope', lifetime)
    return { token, expires }
  }
}

function scopeKey(scopes: string[]): string {
  return [...scopes].sort().join(' ')
}
