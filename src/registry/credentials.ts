import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import debug from 'debug'
import { ImageError, errnoCode } from '../errors.js'
import { childEnv } from './trust.js'

const log = debug('blobcache:registry:credentials')

/** A user name and password, or an OAuth2 identity (refresh) token. */
export type Credentials = { username: string; password: string } | { identityToken: string }

/** Options of {@link findCredentials}. Each field documents its default. */
export interface CredentialOptions {
  /** Explicit credentials; when set, no file is read. */
  credentials?: Credentials
  /**
   * The only auth file to read (`--authfile`). Default `$REGISTRY_AUTH_FILE`; when neither is set,
   * the usual places: `$XDG_RUNTIME_DIR/containers/auth.json`, `$XDG_CONFIG_HOME/containers/auth.json`,
   * `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`), `~/.dockercfg`.
   */
  authFile?: string
  /** Environment to read the variables above and PATH from. Default `process.env`. */
  env?: NodeJS.ProcessEnv
  signal?: AbortSignal
}

/** One auth file as found on disk, with whether it is the legacy `~/.dockercfg` shape. */
interface AuthPath {
  path: string
  legacy: boolean
}

interface AuthEntry {
  auth?: string
  username?: string
  password?: string
  identitytoken?: string
}

interface AuthFile {
  auths?: Record<string, AuthEntry>
  credHelpers?: Record<string, string>
  credsStore?: string
}

/** The auth files consulted, in order, for `opts`. */
export function authFilePaths(opts: CredentialOptions = {}): AuthPath[] {
  const env = opts.env ?? process.env
  const explicit = opts.authFile ?? env.REGISTRY_AUTH_FILE
  if (explicit) return [{ path: explicit, legacy: false }]
  const home = env.HOME || homedir()
  const paths: AuthPath[] = []
  if (env.XDG_RUNTIME_DIR) paths.push({ path: join(env.XDG_RUNTIME_DIR, 'containers', 'auth.json'), legacy: false })
  else if (process.getuid) paths.push({ path: `/run/containers/${process.getuid()}/auth.json`, legacy: false })
  paths.push({ path: join(env.XDG_CONFIG_HOME || join(home, '.config'), 'containers', 'auth.json'), legacy: false })
  paths.push({ path: join(env.DOCKER_CONFIG || join(home, '.docker'), 'config.json'), legacy: false })
  paths.push({ path: join(home, '.dockercfg'), legacy: true })
  return paths
}

/**
 * Normalises an auth-file key to `host[/path]`: `https://index.docker.io/v1/` → `docker.io`,
 * `http://quay.io` → `quay.io`, `quay.io/org` stays.
 */
export function normalizeAuthKey(key: string): string {
  let k = key
  const scheme = /^https?:\/\//.exec(k)
  if (scheme) k = k.slice(scheme[0].length).split('/')[0]
  k = k.replace(/\/+$/, '')
  const [host, ...rest] = k.split('/')
  const h = host === 'index.docker.io' || host === 'registry-1.docker.io' ? 'docker.io' : host
  return [h, ...rest].join('/')
}

/** Keys to look up for `registry/repository`, most specific first (`quay.io/a/b`, `quay.io/a`, `quay.io`). */
function lookupKeys(registry: string, repository?: string): string[] {
  const keys: string[] = []
  if (repository) {
    const parts = repository.split('/')
    for (let n = parts.length; n > 0; n--) keys.push(`${registry}/${parts.slice(0, n).join('/')}`)
  }
  keys.push(registry)
  return keys
}

/**
 * Finds credentials for `registry` (a host, `docker.io` for Docker Hub) and optionally the
 * repository: explicit options first, then each auth file in {@link authFilePaths} order. In a
 * file, `credHelpers[registry]` wins, then `auths` (namespaced keys most specific first), then
 * `credsStore`. Resolves undefined for anonymous access. A malformed file or a failing
 * credential helper MUST reject with `UNAUTHORIZED`; a missing file or helper is skipped.
 */
export async function findCredentials(
  registry: string,
  repository: string | undefined,
  opts: CredentialOptions = {},
): Promise<Credentials | undefined> {
  if (opts.credentials) return opts.credentials
  for (const file of authFilePaths(opts)) {
    const doc = await readAuthFile(file)
    if (!doc) continue
    const helper = doc.credHelpers?.[registry]
    if (helper) {
      const found = await runCredentialHelper(helper, registry, opts)
      if (found) return found
    }
    const auths = new Map<string, AuthEntry>()
    for (const [key, entry] of Object.entries(doc.auths ?? {})) {
      const k = normalizeAuthKey(key)
      if (!auths.has(k) || key === k) auths.set(k, entry)
    }
    for (const key of lookupKeys(registry, repository)) {
      const entry = auths.get(key)
      const creds = entry && decodeEntry(entry, file.path, key)
      if (creds) {
        log('credentials for %s from %s (%s)', registry, file.path, key)
        return creds
      }
    }
    if (doc.credsStore) {
      const found = await runCredentialHelper(doc.credsStore, registry, opts)
      if (found) return found
    }
  }
  log('no credentials for %s', registry)
  return undefined
}

async function readAuthFile(file: AuthPath): Promise<AuthFile | undefined> {
  let text: string
  try {
    text = await readFile(file.path, 'utf8')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return undefined
    throw new ImageError('UNAUTHORIZED', `reading auth file ${file.path}: ${(err as Error).message}`, { cause: err })
  }
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch (err) {
    throw new ImageError('UNAUTHORIZED', `auth file ${file.path} is not valid JSON`, { cause: err })
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) {
    throw new ImageError('UNAUTHORIZED', `auth file ${file.path} is not a JSON object`)
  }
  if (file.legacy) return { auths: doc as Record<string, AuthEntry> }
  return doc as AuthFile
}

function decodeEntry(entry: AuthEntry, path: string, key: string): Credentials | undefined {
  if (typeof entry.identitytoken === 'string' && entry.identitytoken) return { identityToken: entry.identitytoken }
  if (typeof entry.auth === 'string' && entry.auth) {
    const plain = Buffer.from(entry.auth, 'base64').toString('utf8')
    const colon = plain.indexOf(':')
    if (colon <= 0) throw new ImageError('UNAUTHORIZED', `auth file ${path}: entry ${key} is not base64 of user:password`)
    return { username: plain.slice(0, colon), password: plain.slice(colon + 1) }
  }
  if (typeof entry.username === 'string' && typeof entry.password === 'string') {
    return { username: entry.username, password: entry.password }
  }
  return undefined
}

/**
 * Asks `docker-credential-<name> get` for the credentials of `registry`. Resolves undefined
 * when the helper is not installed or knows no credentials for it.
 */
export function runCredentialHelper(name: string, registry: string, opts: CredentialOptions = {}): Promise<Credentials | undefined> {
  if (!/^[A-Za-z0-9_.-]+$/.test(name)) throw new ImageError('UNAUTHORIZED', `invalid credential helper name ${JSON.stringify(name)}`)
  const program = `docker-credential-${name}`
  const serverURL = registry === 'docker.io' ? 'https://index.docker.io/v1/' : registry
  return new Promise((resolve, reject) => {
    const child = execFile(
      program,
      ['get'],
      { env: childEnv(opts.env ?? process.env), timeout: 60_000, maxBuffer: 1 << 20, signal: opts.signal },
      (err, stdout, stderr) => {
        if (opts.signal?.aborted) return reject(opts.signal.reason)
        if (err && errnoCode(err) === 'ENOENT') {
          log('credential helper %s is not installed', program)
          return resolve(undefined)
        }
        const said = `${stdout}${stderr}`.trim()
        if (err) {
          if (/credentials not found/i.test(said)) return resolve(undefined)
          return reject(new ImageError('UNAUTHORIZED', `${program} get ${serverURL} failed: ${said || err.message}`, { cause: err }))
        }
        let out: { Username?: unknown; Secret?: unknown }
        try {
          out = JSON.parse(stdout) as typeof out
        } catch (cause) {
          return reject(new ImageError('UNAUTHORIZED', `${program} get ${serverURL} printed no JSON`, { cause }))
        }
        if (typeof out.Secret !== 'string' || out.Secret === '') return resolve(undefined)
        log('credentials for %s from %s', registry, program)
        if (out.Username === '<token>') return resolve({ identityToken: out.Secret })
        resolve({ username: typeof out.Username === 'string' ? out.Username : '', password: out.Secret })
      },
    )
    child.stdin?.on('error', () => {}) // EPIPE when the helper is missing or exits early
    child.stdin?.end(serverURL)
  })
}
