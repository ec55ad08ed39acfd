// Per-registry TLS material in a certificates directory, laid out as containers/image and docker
// read it (containers-certs.d(5)): in a directory named after the registry's `host[:port]`,
// every `*.crt` file holds certificate authorities to trust besides the usual ones, and a
// `NAME.cert` with its `NAME.key` is a client certificate and its key. A `.cert` without its
// `.key`, or the other way round, is an error, as there.
import { readFile, readdir, stat } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import debug from 'debug'
import { ImageError, errnoCode } from '../errors.js'

const log = debug('blobcache:registry:certs')

/** The system-wide places of per-host directories, after the user's own (`~/.config/containers/certs.d`). */
export const SYSTEM_CERT_DIRS = ['/etc/containers/certs.d', '/etc/docker/certs.d']

/** What a certificates directory holds. */
export interface CertDirContents {
  /** The directory read. */
  dir: string
  /** PEM text of each `*.crt` file, in name order. */
  authorities: string[]
  /** The first client certificate and key pair in name order (`NAME.cert`, `NAME.key`), PEM. */
  client?: { cert: string; key: string; name: string }
}

/** Options of {@link findCertDir}. */
export interface CertDirOptions {
  /** The one directory to use (skopeo's `--cert-dir`); it need not exist. */
  certDir?: string
  /** Environment to read HOME from. Default `process.env`. */
  env?: NodeJS.ProcessEnv
  /** The system-wide places. Default {@link SYSTEM_CERT_DIRS}. */
  systemDirs?: string[]
}

/**
 * The certificates directory of `registry` (the `host[:port]` of image references, `docker.io`
 * for Docker Hub): `certDir` when given; else the first of
 * `~/.config/containers/certs.d/<registry>`, `/etc/containers/certs.d/<registry>` and
 * `/etc/docker/certs.d/<registry>` that exists (one that cannot be looked at for lack of
 * permission is skipped). Undefined when there is none.
 */
export async function findCertDir(registry: string, opts: CertDirOptions = {}): Promise<string | undefined> {
  if (opts.certDir !== undefined) return opts.certDir
  // a name that would leave the directory is never looked up (references cannot hold one)
  if (registry === '' || registry === '.' || registry === '..' || registry.includes('/') || registry.includes('\0')) return undefined
  const home = (opts.env ?? process.env).HOME || homedir()
  for (const root of [join(home, '.config', 'containers', 'certs.d'), ...(opts.systemDirs ?? SYSTEM_CERT_DIRS)]) {
    const dir = join(root, registry)
    try {
      await stat(dir)
      return dir
    } catch (err) {
      const code = errnoCode(err)
      if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'EACCES' || code === 'EPERM') continue
      throw new ImageError('CERT_DIR_INVALID', `looking for certificates of ${registry} in ${dir}: ${(err as Error).message}`, { cause: err })
    }
  }
  return undefined
}

/**
 * Reads a certificates directory; undefined when it does not exist. Fails `CERT_DIR_INVALID`
 * for a client certificate without its key or a key without its certificate, and for a file
 * that cannot be read. The PEM is not parsed here: TLS does that when the connection is set up.
 */
export async function readCertDir(dir: string): Promise<CertDirContents | undefined> {
  let names: string[]
  try {
    names = (await readdir(dir, { withFileTypes: true })).filter((e) => !e.isDirectory()).map((e) => e.name).sort()
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw new ImageError('CERT_DIR_INVALID', `reading certificates directory ${dir}: ${(err as Error).message}`, { cause: err })
  }
  const has = new Set(names)
  const read = async (name: string) => {
    try {
      return await readFile(join(dir, name), 'utf8')
    } catch (err) {
      throw new ImageError('CERT_DIR_INVALID', `reading ${join(dir, name)}: ${(err as Error).message}`, { cause: err })
    }
  }
  const out: CertDirContents = { dir, authorities: [] }
  for (const name of names) {
    if (name.endsWith('.crt')) {
      log('%s: certificate authority %s', dir, name)
      out.authorities.push(await read(name))
    } else if (name.endsWith('.cert')) {
      const key = `${name.slice(0, -'.cert'.length)}.key`
      if (!has.has(key)) {
        throw new ImageError('CERT_DIR_INVALID', `${dir}: client certificate ${name} has no key ${key} (certificate authorities take the extension .crt)`)
      }
      if (!out.client) {
        log('%s: client certificate %s', dir, name)
        out.client = { cert: await read(name), key: await read(key), name }
      }
    } else if (name.endsWith('.key')) {
      const cert = `${name.slice(0, -'.key'.length)}.cert`
      if (!has.has(cert)) throw new ImageError('CERT_DIR_INVALID', `${dir}: key ${name} has no client certificate ${cert}`)
    }
  }
  return out
}
