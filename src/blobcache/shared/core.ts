// What every part of the shared tier uses: the registry client of the tier's repository, the
// counters, the warnings, the breaker that stops asking a tier that has shown itself unusable,
// request time limits, and reading entries (fresh, or memoized for lookups).
import { Readable } from 'node:stream'
import debug from 'debug'
import type { Digest } from '../../digest.js'
import { ImageError, isImageError } from '../../errors.js'
import { type ClientOptions, RegistryClient } from '../../registry/client.js'
import { fetchManifest } from '../../registry/manifests.js'
import { type RetryPolicy, isTransient, untilAborted } from '../../registry/retry.js'
import { headBlob, uploadBlob } from '../../registry/upload.js'
import type { SharedStats } from './tier.js'
import { EMPTY_CONFIG, EMPTY_CONFIG_BYTES, type SharedEntry, entryTag, parseEntryManifest } from './format.js'

const log = debug('blobcache:blobcache:shared')

/** The tier client's retry policy by default: short, so that a down tier cannot stall a copy. */
export const DEFAULT_TIER_RETRY: Readonly<RetryPolicy> = { attempts: 2, baseDelay: 100, maxDelay: 1000, maxRetryAfter: 1000 }

/** The counters of a tier, without the derived `pending`. */
export type TierCounters = Omit<SharedStats, 'pending'>

/** Settings of a {@link TierCore}. */
export interface TierCoreOptions {
  registry: string
  repository: string
  client: ClientOptions
  cooldownMs: number
  timeoutMs: number
  onWarning: (message: string) => void
}

/**
 * True when `err` shows the tier unusable for now: no answer at all (refused, reset, timed out),
 * 401 or 403, 429, or a 5xx (the client has retried those already).
 */
export function showsTierUnusable(err: unknown): boolean {
  if ((err as { name?: unknown } | null)?.name === 'TimeoutError') return true
  const status = (err as { status?: unknown } | null)?.status
  if (typeof status === 'number') return status === 0 || status === 401 || status === 403 || status === 429 || status >= 500
  if (isImageError(err, 'UNAUTHORIZED') || isImageError(err, 'DENIED')) return true
  return isTransient(err)
}

/** True for a refusal for want of rights: 401, 403 (or their codes). */
function isRefusal(err: unknown): boolean {
  const status = (err as { status?: unknown } | null)?.status
  return status === 401 || status === 403 || isImageError(err, 'UNAUTHORIZED') || isImageError(err, 'DENIED')
}

/** The first line of an error's message. */
export function reason(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n')[0]
}

/**
 * An abort signal that fires when `ms` pass without {@link poke}, or when `parent` aborts (with
 * the parent's reason). Its timeout reason is a `TimeoutError`. {@link stop} MUST be called.
 */
export class Watchdog {
  readonly #controller = new AbortController()
  readonly signal: AbortSignal
  readonly #ms: number
  #timer: NodeJS.Timeout | undefined

  constructor(ms: number, parent?: AbortSignal) {
    this.#ms = ms
    this.signal = parent ? AbortSignal.any([parent, this.#controller.signal]) : this.#controller.signal
    this.poke()
  }

  /** Restarts the countdown. */
  poke(): void {
    clearTimeout(this.#timer)
    this.#timer = setTimeout(() => {
      this.#controller.abort(new DOMException(`no progress for ${this.#ms} ms`, 'TimeoutError'))
    }, this.#ms)
    this.#timer.unref()
  }

  /** Ends the countdown for good (the signal then never fires on its own). */
  stop(): void {
    clearTimeout(this.#timer)
  }
}

/** The shared state of one tier (see the module comment). */
export class TierCore {
  readonly registry: string
  readonly repository: string
  readonly client: RegistryClient
  readonly counters: TierCounters = {
    hits: 0, misses: 0, errors: 0, warnings: 0, uploaded: 0, mounted: 0, skipped: 0, notesMerged: 0,
    dropped: 0, failed: 0, bytesUploaded: 0, bytesDownloaded: 0,
  }
  readonly cooldownMs: number
  readonly timeoutMs: number
  readonly #onWarning: (message: string) => void
  #downUntil = 0
  #writesDownUntil = 0
  readonly #lastWarned = new Map<string, number>()
  readonly #memo = new Map<Digest, SharedEntry | null>()
  readonly #lookups = new Map<Digest, Promise<SharedEntry | undefined>>()
  #emptyConfig: Promise<void> | undefined

  constructor(opts: TierCoreOptions) {
    this.registry = opts.registry
    this.repository = opts.repository
    this.cooldownMs = opts.cooldownMs
    this.timeoutMs = opts.timeoutMs
    this.#onWarning = opts.onWarning
    this.client = new RegistryClient(opts.registry, opts.client)
  }

  /** `docker://registry/repository`. */
  get name(): string {
    return `docker://${this.registry}/${this.repository}`
  }

  /** True while the breaker is open: the tier failed recently and is not asked. */
  get down(): boolean {
    return Date.now() < this.#downUntil
  }

  /** True while writes are not attempted: the tier is down, or it refused a write recently. */
  get writesDown(): boolean {
    return this.down || Date.now() < this.#writesDownUntil
  }

  /** Emits one warning line (counted). A callback that throws is ignored. */
  warn(message: string): void {
    this.counters.warnings++
    try {
      this.#onWarning(message)
    } catch (err) {
      log('warning callback failed: %s', reason(err))
    }
  }

  /** Emits a warning unless one of the same `key` was emitted within the cooldown. */
  warnLimited(key: string, message: string): void {
    const last = this.#lastWarned.get(key)
    if (last !== undefined && Date.now() - last < this.cooldownMs) return log('(warning suppressed) %s', message)
    this.#lastWarned.set(key, Date.now())
    this.warn(message)
  }

  /** Counts a failure of the tier and logs it. */
  error(what: string, err?: unknown): void {
    this.counters.errors++
    log('%s: %s: %s', this.name, what, err === undefined ? 'failed' : reason(err))
  }

  /**
   * Reports a failed tier request (counted). When the error shows the tier unusable the breaker
   * opens for the cooldown, with one warning line if it was closed, and true is returned. A
   * write (`side` 'write') refused for want of rights (401/403) only stops writes: a tier may
   * be read-only for some of its users.
   */
  failed(what: string, err: unknown, side: 'read' | 'write' = 'read'): boolean {
    this.error(what, err)
    if (!showsTierUnusable(err)) return false
    const until = Date.now() + this.cooldownMs
    const seconds = Math.round(this.cooldownMs / 1000)
    if (side === 'write' && isRefusal(err)) {
      const wasDown = this.writesDown
      this.#writesDownUntil = until
      if (!wasDown) this.warn(`shared cache ${this.name} refuses writes (${reason(err)}); not pushing for ${seconds} s`)
      return true
    }
    const wasDown = this.down
    this.#downUntil = until
    if (!wasDown) this.warn(`shared cache ${this.name} unusable (${reason(err)}); not asked again for ${seconds} s`)
    return true
  }

  /** `signal` combined with the request time limit. */
  timed(signal?: AbortSignal, ms = this.timeoutMs): AbortSignal {
    const limit = AbortSignal.timeout(ms)
    return signal ? AbortSignal.any([signal, limit]) : limit
  }

  /**
   * Reads the entry of `digest` from the tier now (no memo; the memo is updated): null when
   * there is none, or when what is there is not a valid entry (counted). Other failures reject;
   * an abort rejects with `signal.reason`.
   */
  async readEntry(digest: Digest, signal?: AbortSignal): Promise<SharedEntry | null> {
    const tag = entryTag(digest)
    if (!tag) return null
    let bytes: Buffer
    try {
      bytes = (await fetchManifest(this.client, this.repository, tag, this.timed(signal))).bytes
    } catch (err) {
      if (signal?.aborted) throw signal.reason
      if (isImageError(err, 'MANIFEST_UNKNOWN') || isImageError(err, 'NAME_UNKNOWN')) {
        this.#memo.set(digest, null)
        return null
      }
      throw err
    }
    let entry: SharedEntry | null = null
    try {
      entry = parseEntryManifest(bytes, digest)
    } catch (err) {
      this.error(`reading the entry ${tag}`, err)
    }
    this.#memo.set(digest, entry)
    return entry
  }

  /**
   * The entry of `digest`, memoized; concurrent calls share one request, which is not tied to
   * any caller's signal. Undefined when absent, invalid, or the tier is unusable (counted).
   * Rejects only with `signal.reason`.
   */
  async lookup(digest: Digest, signal?: AbortSignal): Promise<SharedEntry | undefined> {
    signal?.throwIfAborted()
    if (!entryTag(digest)) return undefined
    const memo = this.#memo.get(digest)
    if (memo !== undefined) return memo ?? undefined
    if (this.down) return undefined
    let pending = this.#lookups.get(digest)
    if (!pending) {
      const p = this.readEntry(digest).then(
        (e) => e ?? undefined,
        (err: unknown) => {
          this.failed(`looking up ${digest}`, err)
          return undefined
        },
      )
      pending = p.finally(() => {
        if (this.#lookups.get(digest) === pending) this.#lookups.delete(digest)
      })
      this.#lookups.set(digest, pending)
    }
    return signal ? untilAborted(pending, signal) : pending
  }

  /** Treats the entry of `digest` as absent from now on in this process (its blob proved bad). */
  forget(digest: Digest): void {
    this.#memo.set(digest, null)
  }

  /** Records what the tier now holds for `entry.digest` (after a write). */
  remember(entry: SharedEntry): void {
    this.#memo.set(entry.digest, entry)
  }

  /**
   * Makes sure the empty config blob is in the repository (HEAD, else upload), once per tier;
   * a failure is forgotten so that the next call tries again. Rejects with the failure, or
   * `signal.reason`.
   */
  ensureEmptyConfig(signal?: AbortSignal): Promise<void> {
    if (!this.#emptyConfig) {
      const p = (async () => {
        const have = await headBlob(this.client, this.repository, EMPTY_CONFIG.digest, this.timed(), true)
        if (have !== undefined) return
        const info = { digest: EMPTY_CONFIG.digest, size: EMPTY_CONFIG.size }
        await uploadBlob(this.client, this.repository, Readable.from([EMPTY_CONFIG_BYTES]), info, { signal: this.timed() })
        log('uploaded the empty config to %s', this.name)
      })()
      p.catch(() => {
        if (this.#emptyConfig === p) this.#emptyConfig = undefined
      })
      this.#emptyConfig = p
    }
    return signal ? untilAborted(this.#emptyConfig, signal) : this.#emptyConfig
  }
}

/** A write that did not stick after every attempt (other writers kept overwriting it). */
export class NotConvergedError extends ImageError {
  override name = 'NotConvergedError'
  constructor(digest: Digest, attempts: number) {
    super('REGISTRY_ERROR', `the shared entry of ${digest} did not keep our notes after ${attempts} writes`)
  }
}
