// Names of images in the cache. Every name is stored and looked up in one canonical form, the
// full normalised reference (`docker.io/library/alpine:latest`), so `alpine`, `alpine:latest`,
// `docker.io/alpine` and `index.docker.io/library/alpine` are one key (linuxkit keeps them apart).
import { type Digest } from '../digest.js'
import { ImageError, isImageError } from '../errors.js'
import { type NamedReference, parseNormalizedNamed, withDefaultTag } from '../name.js'

/** The annotation that names a root in `index.json` (the full reference, as linuxkit writes it). */
export const REF_NAME = 'org.opencontainers.image.ref.name'
/** The annotation containerd and buildkit use for the image name in OCI tars. */
export const CONTAINERD_NAME = 'io.containerd.image.name'

/** A parsed cache reference: the canonical key and the parts a lookup needs. */
export interface CacheName {
  /** The normalised reference, `:latest` added when it had neither tag nor digest. */
  readonly ref: NamedReference
  /** The canonical string stored in `org.opencontainers.image.ref.name`. */
  readonly key: string
  /** The digest, when the reference names one. */
  readonly digest?: Digest
}

/**
 * Expands a reference as docker does and adds `:latest` when it has neither tag nor digest:
 * `alpine` -> `docker.io/library/alpine:latest`, `foo/bar` -> `docker.io/foo/bar:latest`,
 * `localhost:5000/x` -> `localhost:5000/x:latest`; `localhost/x`, `reg.io/x` and `a/b/c` keep
 * their domain. Throws `REFERENCE_INVALID` for an empty or malformed reference, including a
 * malformed digest (`x@sha256:abc`).
 */
export function cacheName(s: string | NamedReference): CacheName {
  if (typeof s === 'string' && s.trim() === '') throw new ImageError('REFERENCE_INVALID', 'an image name is required')
  const ref = withDefaultTag(typeof s === 'string' ? parseNormalizedNamed(s) : s)
  return { ref, key: ref.toString(), ...(ref.digest ? { digest: ref.digest } : {}) }
}

/** The canonical key of a reference string (see {@link cacheName}). */
export function cacheKey(s: string | NamedReference): string {
  return cacheName(s).key
}

/**
 * The canonical key of a name found in an `index.json` entry or an archive, or undefined when
 * it does not parse as a docker reference (such entries are kept as they are, never guessed at).
 */
export function storedKey(name: unknown): string | undefined {
  if (typeof name !== 'string' || name === '') return undefined
  try {
    return cacheKey(name)
  } catch (err) {
    if (isImageError(err, 'REFERENCE_INVALID')) return undefined
    throw err
  }
}

/** The name annotation of a descriptor-like entry, if it is a string. */
export function entryName(entry: { annotations?: Record<string, unknown> | Record<string, string> }): string | undefined {
  const n = entry.annotations?.[REF_NAME]
  return typeof n === 'string' ? n : undefined
}
