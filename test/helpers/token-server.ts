// A small token server for the registry's bearer-token auth: `GET /token?service&scope` (with
// Basic credentials, or none) and the OAuth2 `POST /token` refresh-token grant, answering
// ES256 JWTs that the real docker-registry verifies against the certificate written here.
import { randomUUID, createPrivateKey, sign, type KeyObject } from 'node:crypto'
import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { promisify } from 'node:util'

const exec = promisify(execFile)

/** Options of {@link startTokenServer}. Each field documents its default. */
export interface TokenServerOptions {
  /** Directory for the key and certificate (the caller removes it). */
  dir: string
  /** `service` (the JWT audience). Default `test-registry`. */
  service?: string
  /** `iss` of the tokens. Default `test-issuer`. */
  issuer?: string
  /** User names and passwords accepted with Basic auth. Default `{ alice: 'wonderland' }`. */
  users?: Record<string, string>
  /** Identity (refresh) tokens accepted by the POST grant, mapped to user names. Default none. */
  identityTokens?: Record<string, string>
  /**
   * Actions granted to `user` (undefined when anonymous) on `repository`, out of those asked.
   * Default: everything asked for a known user, nothing for anonymous requests.
   */
  grant?: (user: string | undefined, repository: string, actions: string[]) => string[]
  /** `expires_in` reported, in seconds. Default 300. */
  expiresIn?: number
}

/** One token request as seen by the server. */
export interface TokenRequest {
  method: string
  user: string | undefined
  scopes: string[]
  status: number
}

/** A running token server. */
export interface TokenServer {
  /** The realm URL for the registry config and challenges. */
  realm: string
  service: string
  issuer: string
  /** PEM certificate the registry trusts (`rootcertbundle`). */
  certPath: string
  /** Every request answered, in order. */
  requests: TokenRequest[]
  /** Issue the next `n` tokens already expired (the registry then answers 401). */
  expireNext(n: number): void
  close(): Promise<void>
}

/** Starts a token server on 127.0.0.1 on a free port, with a fresh P-256 key and certificate. */
export async function startTokenServer(opts: TokenServerOptions): Promise<TokenServer> {
  const service = opts.service ?? 'test-registry'
  const issuer = opts.issuer ?? 'test-issuer'
  const users = opts.users ?? { alice: 'wonderland' }
  const keyPath = join(opts.dir, 'token-key.pem')
  const certPath = join(opts.dir, 'token-cert.pem')
  await exec('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', keyPath, '-out', certPath, '-days', '30', '-subj', `/CN=${issuer}`,
  ])
  const key = createPrivateKey(await readFile(keyPath))
  const certPem = await readFile(certPath, 'utf8')
  const der = certPem.replace(/-----(BEGIN|END) CERTIFICATE-----/g, '').replace(/\s+/g, '')
  const requests: TokenRequest[] = []
  let expired = 0

  const grant =
    opts.grant ?? ((user: string | undefined, _repo: string, actions: string[]) => (user === undefined ? [] : actions))

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://token')
    let user: string | undefined
    let scopes: string[]
    const reply = (status: number, body: unknown) => {
      requests.push({ method: req.method ?? '', user, scopes: scopes ?? [], status })
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body))
    }
    if (url.pathname !== '/token') return reply(404, { errors: [{ code: 'NOT_FOUND', message: 'no such path' }] })
    if (req.method === 'POST') {
      const form = new URLSearchParams(await readBody(req))
      scopes = (form.get('scope') ?? '').split(' ').filter(Boolean)
      user = opts.identityTokens?.[form.get('refresh_token') ?? '']
      if (form.get('grant_type') !== 'refresh_token' || !user) {
        return reply(401, { errors: [{ code: 'UNAUTHORIZED', message: 'invalid refresh token' }] })
      }
    } else {
      scopes = url.searchParams.getAll('scope')
      const auth = req.headers.authorization
      if (auth) {
        const plain = Buffer.from(auth.replace(/^Basic\s+/i, ''), 'base64').toString()
        const colon = plain.indexOf(':')
        const [name, password] = [plain.slice(0, colon), plain.slice(colon + 1)]
        if (!/^Basic\s/i.test(auth) || colon < 0 || users[name] !== password) {
          return reply(401, { errors: [{ code: 'UNAUTHORIZED', message: 'bad credentials' }] })
        }
        user = name
      }
    }
    const access = scopes.flatMap((scope) => {
      const m = /^([a-z]+):(.+):([a-z*,]*)$/.exec(scope)
      if (!m) return []
      const actions = grant(user, m[2], m[3].split(',').filter(Boolean))
      return actions.length ? [{ type: m[1], name: m[2], actions }] : []
    })
    const now = Math.floor(Date.now() / 1000)
    const lifetime = opts.expiresIn ?? 300
    const exp = expired > 0 ? now - 3600 : now + lifetime
    if (expired > 0) expired--
    const token = jwt(key, der, {
      iss: issuer, sub: user ?? '', aud: service, exp, nbf: now - 3600 - 60, iat: now - 3600 - 60, jti: randomUUID(), access,
    })
    reply(200, { token, access_token: token, expires_in: lifetime, issued_at: new Date().toISOString() })
  }

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err) => res.writeHead(500).end(String(err)))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service,
    issuer,
    certPath,
    requests,
    expireNext: (n) => {
      expired = n
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}

function b64url(data: Buffer | string): string {
  return Buffer.from(data).toString('base64url')
}

function jwt(key: KeyObject, certDer: string, claims: Record<string, unknown>): string {
  const head = b64url(JSON.stringify({ alg: 'ES256', typ: 'JWT', x5c: [certDer] }))
  const body = b64url(JSON.stringify(claims))
  const signature = sign('sha256', Buffer.from(`${head}.${body}`), { key, dsaEncoding: 'ieee-p1363' })
  return `${head}.${body}.${b64url(signature)}`
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => resolve(Buffer.concat(chunks).toString()))
    req.on('error', reject)
  })
}
