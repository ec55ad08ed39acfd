/**
 * Every error code of blobcache. The first group follows the OCI distribution spec, so a missing
 * blob reads `BLOB_UNKNOWN` whether it came from disk or from a registry.
 */
export const ERROR_CODES = [
  // OCI distribution-spec words
  'BLOB_UNKNOWN',
  'BLOB_UPLOAD_INVALID',
  'MANIFEST_UNKNOWN',
  'MANIFEST_INVALID',
  'NAME_INVALID',
  'NAME_UNKNOWN',
  'DIGEST_INVALID',
  'SIZE_INVALID',
  'UNAUTHORIZED',
  'DENIED',
  'UNSUPPORTED',
  'TOOMANYREQUESTS',
  // ours
  'REFERENCE_INVALID',
  'TRANSPORT_UNKNOWN',
  'ARCHIVE_INVALID',
  'LAYOUT_INVALID',
  'PLATFORM_UNKNOWN',
  'DIGESTS_NOT_PRESERVED',
  'SIGNATURES_UNSUPPORTED',
  'COMPRESSION_INVALID',
  'CACHE_INVALID',
  'ALREADY_EXISTS',
  'REGISTRY_ERROR',
  'CERT_DIR_INVALID',
  'REGISTRIES_CONF_INVALID',
  'REGISTRY_BLOCKED',
] as const

/** One of {@link ERROR_CODES}. */
export type ErrorCode = (typeof ERROR_CODES)[number]

const KNOWN_CODES: ReadonlySet<string> = new Set(ERROR_CODES)

/**
 * The one error class of blobcache. Callers branch on `err.code`, which stays stable across
 * releases and across two loaded copies of the package.
 */
export class ImageError extends Error {
  override name = 'ImageError'
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options)
  }
}

/** Bytes did not hash to the digest that named them. Code `DIGEST_INVALID`. */
export class DigestMismatchError extends ImageError {
  override name = 'DigestMismatchError'
  constructor(
    readonly expected: string,
    readonly actual: string,
    options?: ErrorOptions,
  ) {
    super('DIGEST_INVALID', `digest mismatch: expected ${expected}, got ${actual}`, options)
  }
}

/**
 * True when `err` carries one of blobcache's error codes (and, if given, that code). Node's own
 * errors (`ENOENT`, …) are not blobcache errors. Works across two loaded copies of the package.
 */
export function isImageError(err: unknown, code?: ErrorCode): err is ImageError {
  if (typeof err !== 'object' || err === null) return false
  const c = (err as { code?: unknown }).code
  if (typeof c !== 'string') return false
  return code === undefined ? KNOWN_CODES.has(c) : c === code
}

/** The `code` of a Node.js system error (`ENOENT`, …), or undefined. */
export function errnoCode(err: unknown): string | undefined {
  const c = (err as { code?: unknown } | null)?.code
  return typeof c === 'string' ? c : undefined
}

/**
 * Returns a `.catch()` handler that turns ENOENT into `code` (default `BLOB_UNKNOWN`) and lets
 * any other error through unchanged: `stat(file).catch(notFound(digest))`.
 */
export function notFound(what: string, code: ErrorCode = 'BLOB_UNKNOWN') {
  return (err: unknown): never => {
    if (errnoCode(err) === 'ENOENT') throw new ImageError(code, `${what}: not found`, { cause: err })
    throw err
  }
}

/** Shorthand for `notFound(digest, 'BLOB_UNKNOWN')`. */
export const blobUnknown = (digest: string) => notFound(`blob ${digest}`, 'BLOB_UNKNOWN')
