import { type ErrorCode, ImageError } from '../errors.js'

/** One entry of a registry's JSON error body (`{"errors":[{code,message,detail}]}`). */
export interface RegistryDiagnostic {
  code: string
  message: string
  detail?: unknown
}

/** What a registry request was about, for the error message and the 404 mapping. */
export type RegistryErrorKind = 'blob' | 'manifest' | 'upload' | 'tags' | 'ping' | 'token'

/** Fields of a {@link RegistryError}. */
export interface RegistryErrorInit {
  /** HTTP status; 0 when no response arrived. */
  status: number
  /** Registry host, e.g. `127.0.0.1:5000`. */
  registry: string
  /** Repository path; '' for registry-wide requests. */
  repository: string
  /** What was being done, e.g. `fetching manifest latest`. */
  action: string
  kind?: RegistryErrorKind
  errors?: RegistryDiagnostic[]
  /** Seconds the registry asked to wait (429/503 `Retry-After`). */
  retryAfter?: number
  cause?: unknown
}

/** Error codes of the distribution spec that have the same name in {@link ErrorCode}. */
const SAME_NAME: ReadonlySet<string> = new Set<ErrorCode>([
  'BLOB_UNKNOWN', 'BLOB_UPLOAD_INVALID', 'MANIFEST_UNKNOWN', 'MANIFEST_INVALID', 'NAME_INVALID', 'NAME_UNKNOWN',
  'DIGEST_INVALID', 'SIZE_INVALID', 'UNAUTHORIZED', 'DENIED', 'UNSUPPORTED', 'TOOMANYREQUESTS',
])

/** Registry codes with a near equivalent of another name. */
const ALIASES: Record<string, ErrorCode> = {
  MANIFEST_BLOB_UNKNOWN: 'MANIFEST_INVALID',
  MANIFEST_UNVERIFIED: 'MANIFEST_INVALID',
  TAG_INVALID: 'MANIFEST_INVALID',
  PAGINATION_NUMBER_INVALID: 'UNSUPPORTED',
  RANGE_INVALID: 'BLOB_UPLOAD_INVALID',
  BLOB_UPLOAD_UNKNOWN: 'BLOB_UPLOAD_INVALID',
}

/**
 * The {@link ErrorCode} for a failed registry request: the registry's first error code when it
 * has an equivalent, else one derived from the status (401, 403, 404 by kind, 429), else
 * `REGISTRY_ERROR`.
 */
export function registryErrorCode(status: number, errors: RegistryDiagnostic[], kind?: RegistryErrorKind): ErrorCode {
  const first = errors[0]?.code?.toUpperCase()
  if (first && SAME_NAME.has(first)) return first as ErrorCode
  if (first && ALIASES[first]) return ALIASES[first]
  if (status === 401) return 'UNAUTHORIZED'
  if (status === 403) return 'DENIED'
  if (status === 429) return 'TOOMANYREQUESTS'
  if (status === 404 && kind === 'blob') return 'BLOB_UNKNOWN'
  if (status === 404 && kind === 'manifest') return 'MANIFEST_UNKNOWN'
  if (status === 404 && kind === 'tags') return 'NAME_UNKNOWN'
  return 'REGISTRY_ERROR'
}

/**
 * A registry answered with an error status (or not at all). Carries the HTTP status, the
 * registry and repository, and the registry's own error list; `code` is the first registry
 * code mapped onto {@link ErrorCode} (see {@link registryErrorCode}).
 */
export class RegistryError extends ImageError {
  override name = 'RegistryError'
  readonly status: number
  readonly registry: string
  readonly repository: string
  readonly errors: RegistryDiagnostic[]
  /** What was being done when it failed. */
  readonly action: string
  /** Seconds to wait before retrying, when the registry said so. */
  readonly retryAfter: number | undefined

  constructor(init: RegistryErrorInit, code?: ErrorCode) {
    const errors = init.errors ?? []
    const where = init.repository ? `${init.registry}/${init.repository}` : init.registry
    const said = errors.map((e) => (e.message ? `${e.code}: ${e.message}` : e.code)).join('; ')
    const why = init.cause instanceof Error ? init.cause.message.split('\n')[0] : ''
    // TLS alerts 42 (bad certificate) and 116 (certificate required): the server wanted ours
    const hint = /SSL alert number (42|116)\b/.test(why)
      ? '; the registry refused the client certificate or wants one: NAME.cert and NAME.key in its certificates directory (--cert-dir)'
      : ''
    const status = init.status ? `HTTP ${init.status}` : `no response${why ? ` (${why}${hint})` : ''}`
    super(
      code ?? registryErrorCode(init.status, errors, init.kind),
      `${init.action} from ${where}: ${status}${said ? ` (${said})` : ''}`,
      init.cause === undefined ? undefined : { cause: init.cause },
    )
    this.status = init.status
    this.registry = init.registry
    this.repository = init.repository
    this.errors = errors
    this.action = init.action
    this.retryAfter = init.retryAfter
  }
}

/** Parses a registry error body; tolerates non-JSON (returns []). */
export function parseErrorBody(text: string): RegistryDiagnostic[] {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch {
    return []
  }
  const list = (doc as { errors?: unknown } | null)?.errors
  if (!Array.isArray(list)) return []
  return list
    .filter((e): e is Record<string, unknown> => typeof e === 'object' && e !== null)
    .map((e) => ({
      code: typeof e.code === 'string' ? e.code : 'UNKNOWN',
      message: typeof e.message === 'string' ? e.message : '',
      ...(e.detail !== undefined ? { detail: e.detail } : {}),
    }))
}
