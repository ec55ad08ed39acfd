import { setTimeout as sleep } from 'node:timers/promises'
import debug from 'debug'
import { errnoCode } from '../errors.js'

const log = debug('blobcache:registry:retry')

/** How requests are retried. Each field documents its default. */
export interface RetryPolicy {
  /** Total attempts, the first included. Default 5. */
  attempts?: number
  /** Delay before the first retry, in ms; doubled on each further one. Default 250. */
  baseDelay?: number
  /** Longest computed backoff, in ms. Default 8000. */
  maxDelay?: number
  /** Longest wait a `Retry-After` may impose, in ms. Default 30 000. */
  maxRetryAfter?: number
}

/** Socket-level error codes after which a request may be sent again. */
const TRANSIENT_CODES = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ENETUNREACH', 'EHOSTUNREACH',
  'ERR_STREAM_PREMATURE_CLOSE',
])

/**
 * True when `err` is worth another attempt: a registry answer of 5xx or 429, or a connection
 * that failed or was reset. Registry errors are recognised by their numeric `status`.
 */
export function isTransient(err: unknown): boolean {
  const status = (err as { status?: unknown } | null)?.status
  if (typeof status === 'number' && status > 0) return status >= 500 || status === 429 || status === 408
  const code = errnoCode(err)
  if (code && TRANSIENT_CODES.has(code)) return true
  const cause = (err as { cause?: unknown } | null)?.cause
  return cause !== undefined && cause !== err && errnoCode(cause) !== undefined && isTransient(cause)
}

/**
 * The wait before retry number `retry` (1-based): `Retry-After` when the error carries one
 * (capped), else exponential backoff with full jitter.
 */
export function retryDelay(retry: number, err: unknown, policy: RetryPolicy = {}): number {
  const after = (err as { retryAfter?: unknown } | null)?.retryAfter
  if (typeof after === 'number' && after >= 0) return Math.min(after * 1000, policy.maxRetryAfter ?? 30_000)
  const ceiling = Math.min((policy.baseDelay ?? 250) * 2 ** (retry - 1), policy.maxDelay ?? 8000)
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2)
}

/** Parses a `Retry-After` header (seconds, or an HTTP date) into seconds; undefined if absent or bad. */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const v = Array.isArray(value) ? value[0] : value
  if (!v) return undefined
  if (/^\s*\d+\s*$/.test(v)) return Number(v)
  const when = Date.parse(v)
  return Number.isNaN(when) ? undefined : Math.max(0, Math.ceil((when - now) / 1000))
}

/**
 * Errors a {@link withRetry} loop gave up on after all its attempts. An enclosing loop does not
 * retry them again by default: nested loops would multiply their attempts (a registry that
 * refused connections took 18 s to fail, 5 pings within each of 5 requests). A caller that
 * retries whole operations on purpose (`copy --retry-times`) asks {@link isTransient} itself.
 */
const exhausted = new WeakSet<object>()

/** True when `err` already went through all the attempts of a {@link withRetry} loop. */
export function retriesExhausted(err: unknown): boolean {
  return typeof err === 'object' && err !== null && exhausted.has(err)
}

/** Options of {@link withRetry}. */
export interface RetryOptions extends RetryPolicy {
  signal?: AbortSignal
  /** What is being done, for the debug log. */
  what?: string
  /** Decides whether an error is retried. Default {@link isTransient}, unless {@link retriesExhausted}. */
  retryable?: (err: unknown) => boolean
}

/**
 * Runs `op` until it resolves, retrying transient failures with backoff. It gives up after
 * `attempts` tries (rejecting with the last error), at once on a non-transient error, and on
 * abort (rejecting with `signal.reason`, also during the wait).
 */
export async function withRetry<T>(op: (attempt: number) => Promise<T>, opts: RetryOptions = {}): Promise<T> {
  const attempts = Math.max(1, opts.attempts ?? 5)
  const retryable = opts.retryable ?? ((err: unknown) => isTransient(err) && !retriesExhausted(err))
  for (let attempt = 1; ; attempt++) {
    opts.signal?.throwIfAborted()
    try {
      return await op(attempt)
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason
      if (!retryable(err)) throw err
      if (attempt >= attempts) {
        if (typeof err === 'object' && err !== null) exhausted.add(err)
        throw err
      }
      const wait = retryDelay(attempt, err, opts)
      log('%s failed (%s), retry %d/%d in %d ms', opts.what ?? 'request', (err as Error).message, attempt, attempts - 1, wait)
      await sleep(wait, undefined, { signal: opts.signal }).catch(() => {
        throw opts.signal?.reason
      })
    }
  }
}

/** `promise`, or a rejection with `signal.reason` as soon as `signal` aborts. */
export function untilAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason)
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
  })
}
