// registries.conf (containers-registries.conf(5)), the part that decides where an image is read
// from: per-namespace `[[registry]]` tables chosen by the longest matching `prefix` (a name, a
// namespace, a repository or `*.domain`), whose `location` remaps the namespace, whose
// `[[registry.mirror]]` tables are tried first (by `pull-from-mirror`, `mirror-by-digest-only`),
// with `insecure` and `blocked`; the deprecated version 1 lists (`[registries.insecure]`,
// `[registries.block]`) too. As in containers/image, mirrors and remapping apply to reading
// only, `blocked` forbids reading, and short names are not resolved here (image names are
// normalised docker-style before they get here).
import { readFile, readdir } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import debug from 'debug'
import { ImageError, errnoCode } from '../errors.js'
import { type NamedReference, parseNormalizedNamed } from '../name.js'
import { type TomlTable, type TomlValue, parseToml } from './toml.js'

const log = debug('blobcache:registry:registries-conf')

/** One `[[registry.mirror]]`. */
export interface MirrorConfig {
  location: string
  insecure: boolean
  pullFromMirror: 'all' | 'digest-only' | 'tag-only'
}

/** One `[[registry]]`. */
export interface RegistryConfig {
  prefix: string
  /** Empty for a `*.domain` prefix: the matched host stays. */
  location: string
  insecure: boolean
  blocked: boolean
  mirrorByDigestOnly: boolean
  mirrors: MirrorConfig[]
}

/** The merged configuration and the files it came from. */
export interface RegistriesConf {
  registries: RegistryConfig[]
  files: string[]
}

/** Options of {@link loadRegistriesConf}. */
export interface RegistriesConfOptions {
  /** The one file to read, no drop-ins (skopeo's `--registries-conf`). Default: CONTAINERS_REGISTRIES_CONF, else the usual places. */
  path?: string
  /** Environment (HOME, CONTAINERS_REGISTRIES_CONF). Default `process.env`. */
  env?: NodeJS.ProcessEnv
  /** The system directory. Default `/etc/containers`. */
  systemDir?: string
}

/** Where one image may be read from, in the order to try. */
export interface PullSource {
  /** The reference to read there (registry, repository, tag or digest). */
  named: NamedReference
  /** From `insecure`: plain HTTP and unverified TLS allowed. */
  insecure: boolean
  /** A mirror (else the primary location). */
  mirror: boolean
}

const EMPTY: RegistriesConf = { registries: [], files: [] }

async function readIfThere(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw new ImageError('REGISTRIES_CONF_INVALID', `reading ${file}: ${(err as Error).message}`, { cause: err })
  }
}

async function dropIns(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).filter((n) => n.endsWith('.conf')).sort().map((n) => join(dir, n))
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return []
    throw new ImageError('REGISTRIES_CONF_INVALID', `reading ${dir}: ${(err as Error).message}`, { cause: err })
  }
}

/**
 * Reads the configuration: `path` (or CONTAINERS_REGISTRIES_CONF) alone when given, which must
 * exist; else `~/.config/containers/registries.conf` if it exists, else
 * `/etc/containers/registries.conf` (none is fine), then the drop-ins of
 * `/etc/containers/registries.conf.d` and `~/.config/containers/registries.conf.d` in name
 * order. A later `[[registry]]` replaces an earlier one with the same prefix.
 */
export async function loadRegistriesConf(opts: RegistriesConfOptions = {}): Promise<RegistriesConf> {
  const env = opts.env ?? process.env
  const explicit = opts.path ?? (env.CONTAINERS_REGISTRIES_CONF || undefined)
  let files: string[]
  if (explicit) {
    files = [explicit]
    if ((await readIfThere(explicit)) === undefined) throw new ImageError('REGISTRIES_CONF_INVALID', `registries configuration ${explicit} does not exist`)
  } else {
    const system = opts.systemDir ?? '/etc/containers'
    const user = join(env.HOME || homedir(), '.config', 'containers')
    const main = (await readIfThere(join(user, 'registries.conf'))) !== undefined ? join(user, 'registries.conf') : join(system, 'registries.conf')
    files = [main, ...(await dropIns(join(system, 'registries.conf.d'))), ...(await dropIns(join(user, 'registries.conf.d')))]
  }
  const byPrefix = new Map<string, RegistryConfig>()
  const read: string[] = []
  for (const file of files) {
    const text = await readIfThere(file)
    if (text === undefined) continue
    read.push(file)
    for (const entry of entries(parseToml(text, file), file)) byPrefix.set(entry.prefix, entry)
  }
  if (read.length) log('registries configuration from %s', read.join(', '))
  return read.length ? { registries: [...byPrefix.values()], files: read } : EMPTY
}

function entries(doc: TomlTable, file: string): RegistryConfig[] {
  const bad = (why: string): never => {
    throw new ImageError('REGISTRIES_CONF_INVALID', `${file}: ${why}`)
  }
  const str = (t: TomlTable, k: string): string => {
    const v = t[k]
    if (v === undefined) return ''
    if (typeof v !== 'string') bad(`${k} must be a string`)
    return v as string
  }
  const bool = (t: TomlTable, k: string): boolean => {
    const v = t[k]
    if (v === undefined) return false
    if (typeof v !== 'boolean') bad(`${k} must be true or false`)
    return v as boolean
  }
  const tables = (v: TomlValue | undefined, what: string): TomlTable[] => {
    if (v === undefined) return []
    if (!Array.isArray(v) || v.some((t) => typeof t !== 'object' || Array.isArray(t))) bad(`${what} must be an array of tables`)
    return v as TomlTable[]
  }
  const out: RegistryConfig[] = []
  // version 1: lists of hosts
  const v1 = doc.registries
  if (v1 !== undefined && !Array.isArray(v1) && typeof v1 === 'object') {
    const list = (k: string): string[] => {
      const t = (v1 as TomlTable)[k]
      if (t === undefined) return []
      const hosts = (t as TomlTable).registries
      if (!Array.isArray(hosts) || hosts.some((h) => typeof h !== 'string')) bad(`registries.${k}.registries must be an array of strings`)
      return hosts as string[]
    }
    if (doc.registry !== undefined) bad('version 1 ([registries.*]) and version 2 ([[registry]]) cannot be mixed')
    const insecure = new Set(list('insecure'))
    const blocked = new Set(list('block'))
    for (const host of new Set([...insecure, ...blocked])) {
      out.push({ prefix: host, location: host, insecure: insecure.has(host), blocked: blocked.has(host), mirrorByDigestOnly: false, mirrors: [] })
    }
    return out
  }
  for (const t of tables(doc.registry, '[[registry]]')) {
    const location = str(t, 'location')
    const prefix = str(t, 'prefix') || location
    if (!prefix) bad('a [[registry]] needs a prefix or a location')
    if (prefix.startsWith('*.') && location) bad(`the wildcard prefix ${prefix} cannot have a location`)
    // as containers/image: only a wildcard prefix goes without a location
    if (!prefix.startsWith('*.') && !location) bad(`the [[registry]] with prefix ${prefix} has no location (only *.domain prefixes may omit it)`)
    const mirrors = tables(t.mirror, '[[registry.mirror]]').map((m): MirrorConfig => {
      const pull = str(m, 'pull-from-mirror') || 'all'
      if (pull !== 'all' && pull !== 'digest-only' && pull !== 'tag-only') bad(`pull-from-mirror must be all, digest-only or tag-only, not ${JSON.stringify(pull)}`)
      const where = str(m, 'location')
      if (!where) bad(`a mirror of ${prefix} has no location`)
      return { location: where, insecure: bool(m, 'insecure'), pullFromMirror: pull as MirrorConfig['pullFromMirror'] }
    })
    out.push({ prefix, location, insecure: bool(t, 'insecure'), blocked: bool(t, 'blocked'), mirrorByDigestOnly: bool(t, 'mirror-by-digest-only'), mirrors })
  }
  return out
}

/** How much of `ref` (`host/path[:tag|@digest]`) `prefix` matches, or -1 (containers/image's rules). */
export function matchLength(ref: string, prefix: string): number {
  if (prefix.startsWith('*.')) {
    const host = ref.slice(0, ref.indexOf('/') < 0 ? ref.length : ref.indexOf('/'))
    const name = host.replace(/:\d+$/, '')
    return name.endsWith(prefix.slice(1)) ? name.length : -1
  }
  if (ref === prefix) return prefix.length
  if (ref.startsWith(prefix) && '/:@'.includes(ref[prefix.length])) return prefix.length
  return -1
}

/** The `[[registry]]` for `named` (longest match), if any. */
export function findRegistryConfig(conf: RegistriesConf, named: NamedReference): { entry: RegistryConfig; matched: number } | undefined {
  const ref = named.toString()
  let best: { entry: RegistryConfig; matched: number } | undefined
  for (const entry of conf.registries) {
    const n = matchLength(ref, entry.prefix)
    if (n >= 0 && (!best || n > best.matched)) best = { entry, matched: n }
  }
  return best
}

/**
 * Where to read `named` from, in order: the mirrors that apply, then the primary location.
 * Fails `REGISTRY_BLOCKED` when the matching `[[registry]]` is blocked.
 */
export function pullSources(conf: RegistriesConf, named: NamedReference): PullSource[] {
  const found = findRegistryConfig(conf, named)
  if (!found) return [{ named, insecure: false, mirror: false }]
  const { entry, matched } = found
  const ref = named.toString()
  if (entry.blocked) {
    throw new ImageError('REGISTRY_BLOCKED', `reading ${ref} is blocked by registries.conf ([[registry]] prefix ${JSON.stringify(entry.prefix)})`)
  }
  const rest = ref.slice(matched)
  const at = (location: string): NamedReference => {
    try {
      return parseNormalizedNamed(location + rest)
    } catch (err) {
      throw new ImageError('REGISTRIES_CONF_INVALID', `registries.conf maps ${ref} to ${location + rest}, which is not a valid name: ${(err as Error).message}`, { cause: err })
    }
  }
  const byDigest = named.digest !== undefined
  const sources: PullSource[] = []
  if (!entry.mirrorByDigestOnly || byDigest) {
    for (const m of entry.mirrors) {
      if ((m.pullFromMirror === 'digest-only' && !byDigest) || (m.pullFromMirror === 'tag-only' && byDigest)) continue
      sources.push({ named: at(m.location), insecure: m.insecure, mirror: true })
    }
  }
  sources.push({ named: entry.location ? at(entry.location) : named, insecure: entry.insecure, mirror: false })
  return sources
}

/**
 * The registry options for reading at `source`: an `insecure` place allows plain HTTP and
 * unverified TLS, unless the caller set `tlsVerify` itself (as containers/image does).
 */
export function sourceOptions<O extends { tlsVerify?: boolean }>(source: PullSource, opts: O): O {
  return source.insecure && opts.tlsVerify === undefined ? { ...opts, tlsVerify: false } : opts
}

/**
 * Tries `open` on each of `sources` in order and resolves the first that succeeds, with its
 * source; rejects with the last failure (or the signal's reason on abort). `name` is the image
 * as named, for the log.
 */
export async function firstServing<S extends { named: NamedReference; mirror?: boolean }, T>(
  name: NamedReference,
  sources: S[],
  open: (source: S) => Promise<T>,
  signal?: AbortSignal,
): Promise<{ source: S; value: T }> {
  let last: unknown
  for (const source of sources) {
    try {
      const value = await open(source)
      if (source.named !== name) log('reading %s from %s%s', name.toString(), source.named.toString(), source.mirror ? ' (mirror)' : '')
      return { source, value }
    } catch (err) {
      if (signal?.aborted) throw signal.reason
      log('reading %s from %s failed: %s', name.toString(), source.named.toString(), (err as Error).message)
      last = err
    }
  }
  throw last
}
