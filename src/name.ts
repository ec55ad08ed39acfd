import { type Digest, parseDigest } from './digest.js'
import { ImageError } from './errors.js'

/** The registry that names without a domain refer to. */
export const DEFAULT_DOMAIN = 'docker.io'
/** The repository namespace of single-component names on {@link DEFAULT_DOMAIN}. */
export const OFFICIAL_REPO_PREFIX = 'library/'
/** The tag {@link withDefaultTag} adds. */
export const DEFAULT_TAG = 'latest'
/** Longest `domain/path` accepted, as in distribution/reference. */
export const NAME_TOTAL_LENGTH_MAX = 255

/**
 * A docker image reference, `domain/path[:tag][@digest]`, after distribution/reference. Values
 * are canonical: built only by {@link parseNormalizedNamed} and {@link parseNamed}.
 */
export interface NamedReference {
  /** Registry host with optional port, e.g. `docker.io`, `localhost:5000`, `[::1]:5000`. */
  readonly domain: string
  /** Repository path within the registry, e.g. `library/alpine`. */
  readonly path: string
  readonly tag?: string
  readonly digest?: Digest
  /** `domain/path`, e.g. `docker.io/library/alpine`. */
  name(): string
  /** The full canonical reference, with `:tag` and `@digest` when present. */
  toString(): string
  /** The short form docker prints, e.g. `alpine:latest` or `foo/bar@sha256:…`. */
  familiar(): string
}

// The grammar of distribution/reference, written out piece by piece.
const ALNUM = '[a-z0-9]+'
const SEPARATOR = '(?:[._]|__|-+)'
const PATH_COMPONENT = `${ALNUM}(?:${SEPARATOR}${ALNUM})*`
const PATH_RE = new RegExp(`^${PATH_COMPONENT}(?:/${PATH_COMPONENT})*$`)
const DOMAIN_COMPONENT = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])'
const HOST = `(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[a-fA-F0-9:]+\\])`
const DOMAIN_RE = new RegExp(`^${HOST}(?::[0-9]+)?$`)
const TAG_RE = /^[\w][\w.-]{0,127}$/
const DIGEST_SHAPE_RE = /^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$/
const IDENTIFIER_RE = /^[a-f0-9]{64}$/

class Reference implements NamedReference {
  constructor(
    readonly domain: string,
    readonly path: string,
    readonly tag?: string,
    readonly digest?: Digest,
  ) {}

  name(): string {
    return `${this.domain}/${this.path}`
  }

  toString(): string {
    return this.name() + suffix(this)
  }

  familiar(): string {
    let name = this.name()
    if (this.domain === DEFAULT_DOMAIN) {
      name = this.path
      const rest = this.path.slice(OFFICIAL_REPO_PREFIX.length)
      if (this.path.startsWith(OFFICIAL_REPO_PREFIX) && !rest.includes('/')) name = rest
    }
    return name + suffix(this)
  }

  toJSON(): string {
    return this.toString()
  }
}

function suffix(ref: NamedReference): string {
  return (ref.tag !== undefined ? `:${ref.tag}` : '') + (ref.digest !== undefined ? `@${ref.digest}` : '')
}

function fail(s: string, why: string, cause?: unknown): never {
  const shown = JSON.stringify(s.length > 300 ? s.slice(0, 300) + '…' : s)
  throw new ImageError('REFERENCE_INVALID', `invalid reference ${shown}: ${why}`, cause ? { cause } : undefined)
}

/**
 * Splits a name into domain and remainder the way docker does: the first component is a domain
 * only when it contains `.` or `:`, is `localhost`, or has an uppercase letter. Otherwise the
 * domain is `docker.io`; `index.docker.io` becomes `docker.io`, and a single-component path on
 * `docker.io` gets the `library/` prefix.
 */
export function splitDockerDomain(s: string): { domain: string; remainder: string } {
  const i = s.indexOf('/')
  const first = i === -1 ? '' : s.slice(0, i)
  let domain: string
  let remainder: string
  if (i === -1 || (!/[.:]/.test(first) && first !== 'localhost' && first.toLowerCase() === first)) {
    domain = DEFAULT_DOMAIN
    remainder = s
  } else {
    domain = first
    remainder = s.slice(i + 1)
  }
  if (domain === 'index.docker.io') domain = DEFAULT_DOMAIN
  if (domain === DEFAULT_DOMAIN && !remainder.includes('/')) remainder = OFFICIAL_REPO_PREFIX + remainder
  return { domain, remainder }
}

/**
 * Parses an image reference as docker does on its command line, normalising it: `alpine` →
 * `docker.io/library/alpine`, `foo/bar` → `docker.io/foo/bar`. A tag and a digest may both be
 * given and are both kept. Throws `REFERENCE_INVALID` for anything outside the grammar, an
 * uppercase repository path, a name longer than 255 characters, a bare 64-hex identifier, or a
 * digest other than a valid sha256/sha512 one.
 */
export function parseNormalizedNamed(s: string): NamedReference {
  if (typeof s !== 'string' || s === '') fail(String(s), 'repository name must have at least one component')
  if (IDENTIFIER_RE.test(s)) fail(s, 'cannot specify 64-byte hexadecimal strings')
  const { domain, remainder } = splitDockerDomain(s)

  let rest = remainder
  let digest: Digest | undefined
  const at = rest.indexOf('@')
  if (at !== -1) {
    const d = rest.slice(at + 1)
    if (!DIGEST_SHAPE_RE.test(d)) fail(s, `malformed digest ${JSON.stringify(d)}`)
    try {
      digest = parseDigest(d)
    } catch (err) {
      fail(s, `unsupported or invalid digest ${JSON.stringify(d)} (sha256 or sha512, lowercase hex)`, err)
    }
    rest = rest.slice(0, at)
  }
  let tag: string | undefined
  const colon = rest.indexOf(':')
  if (colon !== -1) {
    tag = rest.slice(colon + 1)
    if (!TAG_RE.test(tag)) fail(s, `invalid tag ${JSON.stringify(tag)}`)
    rest = rest.slice(0, colon)
  }
  const path = rest
  if (path.toLowerCase() !== path) fail(s, `repository name (${path}) must be lowercase`)
  if (!DOMAIN_RE.test(domain)) fail(s, `invalid domain ${JSON.stringify(domain)}`)
  if (!PATH_RE.test(path)) fail(s, `invalid repository path ${JSON.stringify(path)}`)
  const name = `${domain}/${path}`
  if (name.length > NAME_TOTAL_LENGTH_MAX) {
    fail(s, `repository name must not be more than ${NAME_TOTAL_LENGTH_MAX} characters`)
  }
  return new Reference(domain, path, tag, digest)
}

/**
 * Parses a reference that must already be in canonical form (`docker.io/library/alpine:3`, not
 * `alpine:3`). Throws `REFERENCE_INVALID` otherwise.
 */
export function parseNamed(s: string): NamedReference {
  const ref = parseNormalizedNamed(s)
  if (ref.toString() !== s) fail(s, `not in canonical form (expected ${ref.toString()})`)
  return ref
}

/** True when the reference has a tag. */
export function isTagged(ref: NamedReference): ref is NamedReference & { readonly tag: string } {
  return ref.tag !== undefined
}

/** True when the reference has a digest. */
export function isDigested(ref: NamedReference): ref is NamedReference & { readonly digest: Digest } {
  return ref.digest !== undefined
}

/** Returns `ref` with tag `latest` when it has neither tag nor digest, else `ref` itself. */
export function withDefaultTag(ref: NamedReference): NamedReference {
  if (isTagged(ref) || isDigested(ref)) return ref
  return new Reference(ref.domain, ref.path, DEFAULT_TAG)
}

/** Returns `ref` with its tag replaced by `tag` (its digest is kept). Throws `REFERENCE_INVALID`. */
export function withTag(ref: NamedReference, tag: string): NamedReference {
  if (!TAG_RE.test(tag)) fail(`${ref.name()}:${tag}`, `invalid tag ${JSON.stringify(tag)}`)
  return new Reference(ref.domain, ref.path, tag, ref.digest)
}

/** Returns `ref` with its digest replaced by `digest` (its tag is kept). */
export function withDigest(ref: NamedReference, digest: Digest): NamedReference {
  return new Reference(ref.domain, ref.path, ref.tag, parseDigest(digest))
}

/** Returns the name alone, without tag or digest. */
export function nameOnly(ref: NamedReference): NamedReference {
  return new Reference(ref.domain, ref.path)
}
