// The shared cache tier: a repository on an OCI registry that several machines' blob caches use
// as a second tier behind their local directories. Reads look blobs up by their entry manifest
// (`sha256-<hex>`, see format.ts) and download them verified into the local directory; writes
// go through a bounded write-behind queue. The tier is best effort: a failing tier is a miss on
// reads and a counted failure on writes, with one warning line per cooldown, never an error.
import debug from 'debug'
import type { Digest } from '../../digest.js'
import { ImageError } from '../../errors.js'
import { parseNormalizedNamed } from '../../name.js'
import type { RetryPolicy } from '../../registry/retry.js'
import type { RegistryOptions } from '../../types.js'
import { classifyName } from '../files.js'
import { DEFAULT_TIER_RETRY, TierCore } from './core.js'
import { DownloadSharing, downloadInto } from './fetch.js'
import { type SharedEntry, entryTag } from './format.js'
import { WriteQueue } from './queue.js'

const log = debug('blobcache:blobcache:shared:tier')

/** Options of {@link SharedTier}. Each field documents its default. */
export interface SharedTierOptions {
  /** tlsVerify (false also allows plain http), credentials, authFile. Default: `{}` (TLS verified, auth files). */
  registry?: RegistryOptions
  /** Uploads at once. Default 4. */
  concurrency?: number
  /** Entries waiting to be uploaded; beyond that new ones are dropped (counted in stats.dropped, one warning). Default 1024. */
  maxQueue?: number
  /**
   * After a failure that shows the tier unusable (connection refused/reset, timeout, 401/403,
   * 5xx after retries), the tier is not asked again for this many ms. Default 30_000.
   */
  cooldownMs?: number
  /**
   * Longest a tier request (lookup, HEAD, manifest write) may take, and longest a blob download
   * may go without receiving a byte, in ms; running out counts as the tier being unusable.
   * Uploads may stall for four times as long (at least 20 s). Default 5000.
   */
  requestTimeoutMs?: number
  /** Receives each one-line warning. Default: `process.stderr.write('blobcache: warning: ' + msg + '\n')`. */
  onWarning?: (message: string) => void
  /**
   * Per-request retry policy of the tier's client; fields not given keep their default. Default
   * `{ attempts: 2, baseDelay: 100, maxDelay: 1000, maxRetryAfter: 1000 }` (a down tier must not
   * stall a copy); write jobs are retried as a whole up to 3 times with backoff.
   */
  retry?: RetryPolicy
  /** Environment for auth-file and credential-helper lookup. Default `process.env`. */
  env?: NodeJS.ProcessEnv
}

/** What a tier did, counted over its life. */
export interface SharedStats {
  /** fetchInto calls served from the tier. */
  hits: number
  /**
   * Blobs asked for that the tier could not serve, each digest counted once (a copy asks for a
   * blob from several places: the source, the destination's reuse check, substitution).
   */
  misses: number
  /** Failures: of tier requests, corrupt or wrong-size tier blobs, invalid entries, local note writes. */
  errors: number
  /** Warning lines emitted. */
  warnings: number
  /** Write jobs that uploaded the blob. */
  uploaded: number
  /** Write jobs that mounted the blob from another repository of the registry. */
  mounted: number
  /** Write jobs with nothing to do (the tier already held everything), and blobs that cannot be shared (sha512). */
  skipped: number
  /** Write jobs that found the blob in the tier and wrote only its entry (new or merged notes). */
  notesMerged: number
  /** Write jobs dropped: queue full, flush aborted, or the local entry gone before it was pushed. */
  dropped: number
  /** Write jobs that failed (after retries, or at once while the tier is unusable). */
  failed: number
  /** Write jobs waiting or running. */
  pending: number
  bytesUploaded: number
  bytesDownloaded: number
}

/** Progress of {@link SharedTier.flush}: write jobs done of those accepted, and bytes uploaded, over the tier's life. */
export interface FlushProgress {
  done: number
  total: number
  bytes: number
}

/** A blob placed into a local cache directory by {@link SharedTier.fetchInto}. */
export interface SharedFetchResult {
  path: string
  name: string
  size: number
  isConfig: boolean
}

function defaultWarning(message: string): void {
  process.stderr.write('blobcache: warning: ' + message + '\n')
}

/** Parses `docker://host[:port]/repo` or `host[:port]/repo` (no tag or digest). Throws `REFERENCE_INVALID`. */
function parseTierName(name: string): { registry: string; repository: string } {
  const invalid = (why: string) => new ImageError('REFERENCE_INVALID', `invalid shared cache ${JSON.stringify(name)}: ${why}`)
  if (typeof name !== 'string' || name === '') throw invalid('empty')
  let rest = name
  if (rest.startsWith('docker://')) rest = rest.slice('docker://'.length)
  else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(rest) || /^[a-z][a-z0-9-]*:[^0-9]/i.test(rest)) throw invalid('only docker:// repositories can be a shared cache')
  const named = parseNormalizedNamed(rest)
  if (named.tag !== undefined || named.digest !== undefined) throw invalid('name a repository, without a tag or digest')
  return { registry: named.domain, repository: named.path }
}

/**
 * The second tier of a blob cache: a registry repository shared by many machines. See the
 * module comment and the README's "Shared cache tier" section for the format and semantics.
 */
export class SharedTier {
  /** The registry, as named (`127.0.0.1:5000`). */
  readonly registry: string
  /** The repository within it (`cache/blobs`). */
  readonly repository: string
  readonly #core: TierCore
  readonly #queue: WriteQueue
  readonly #downloads = new DownloadSharing()
  /** Digests counted as misses (each once). */
  readonly #missed = new Set<Digest>()

  /** `name`: `docker://host[:port]/repo` or `host[:port]/repo` (no tag/digest). Throws `REFERENCE_INVALID`. */
  constructor(name: string, opts: SharedTierOptions = {}) {
    const { registry, repository } = parseTierName(name)
    this.registry = registry
    this.repository = repository
    const timeoutMs = opts.requestTimeoutMs ?? 5000
    this.#core = new TierCore({
      registry,
      repository,
      // the ping is bounded like every other request: a silent tier must not hold the process
      client: { ...opts.registry, env: opts.env, retry: { ...DEFAULT_TIER_RETRY, ...opts.retry }, pingTimeout: timeoutMs },
      cooldownMs: opts.cooldownMs ?? 30_000,
      timeoutMs,
      onWarning: opts.onWarning ?? defaultWarning,
    })
    this.#queue = new WriteQueue(this.#core, { concurrency: opts.concurrency ?? 4, maxQueue: opts.maxQueue ?? 1024 })
  }

  /** `docker://registry/repository`. */
  get name(): string {
    return this.#core.name
  }

  /** A snapshot of the counters. */
  get stats(): SharedStats {
    return { ...this.#core.counters, pending: this.#queue.pending }
  }

  /**
   * The tier's entry for `digest` (GET manifest by tag), memoized per process (a write updates
   * the memo). Undefined when absent, unparseable (counted error), not representable (sha512),
   * or the tier is unusable (counted; warning once per cooldown). MUST NOT reject except with
   * `signal.reason`.
   */
  lookup(digest: Digest, signal?: AbortSignal): Promise<SharedEntry | undefined> {
    return this.#core.lookup(digest, signal)
  }

  /**
   * Fetches blob `digest` from the tier into cache directory `dir`: looks up its entry (for size,
   * kind and notes), GETs the blob into a temporary file while verifying size and digest, renames
   * it to `<digest>` (`<digest>.config` for a config) only once verified (replacing a file of
   * that name, whose bytes then equal the verified ones), and records the entry's notes in
   * `dir`'s note files. `size` >= 0 MUST equal the entry's size, else it is a miss. A wrong size
   * or digest in the tier is a miss (counted error, warning), never served. Concurrent calls for
   * one blob and directory share one download. Resolves the placed file, or undefined; counts a
   * hit or a miss. MUST NOT reject except with `signal.reason`, and then leaves no temporary file.
   */
  async fetchInto(dir: string, digest: Digest, size: number, signal?: AbortSignal): Promise<SharedFetchResult | undefined> {
    const core = this.#core
    const entry = await core.lookup(digest, signal)
    let found: SharedFetchResult | undefined
    if (!entry) {
      log('%s: not in %s', digest, core.name)
    } else if (size >= 0 && size !== entry.size) {
      log('%s: %d bytes asked for, the tier has %d', digest, size, entry.size)
    } else if (!core.down) {
      try {
        found = await this.#downloads.join(`${dir}\0${digest}`, (s) => downloadInto(core, dir, entry, s), signal)
      } catch (err) {
        if (signal?.aborted) throw signal.reason
        core.error(`fetching ${digest} into ${dir}`, err) // not expected: downloadInto handles its failures
      }
    }
    if (found) core.counters.hits++
    else if (!this.#missed.has(digest)) {
      this.#missed.add(digest)
      core.counters.misses++
    }
    return found
  }

  /**
   * Queues the local cache entry `dir/name` (`<digest>` or `<digest>.config`) for the
   * write-behind upload and returns at once. Deduplicated by digest: a request for a digest
   * already waiting is absorbed by that job, and a job whose notes are those this process last
   * wrote for the digest does nothing. `hints.kind` 'manifest' marks manifests (otherwise layer
   * or config, from the name); `hints.mountFrom` names a repository on the SAME registry that
   * holds the blob (the job then tries a cross-repository mount before uploading). A blob that
   * cannot be shared (sha512) is counted as skipped; a name that is not a cache entry is
   * counted as an error. The job: reads the entry's local notes and compression, skips when the
   * tier's entry covers them, else makes sure the blob is there (HEAD, mount, upload), makes sure
   * the empty config is there, and writes the merged entry with read-back verification; failures
   * are retried up to 3 times, then counted (failed) with one warning line.
   */
  enqueue(dir: string, name: string, hints: { kind?: 'manifest'; mountFrom?: string } = {}): void {
    const core = this.#core
    const parsed = classifyName(name)
    if ((parsed.kind !== 'blob' && parsed.kind !== 'config') || !parsed.digest) {
      core.error(`not queued: ${JSON.stringify(name)} is not a cache entry name`)
      return
    }
    const digest = parsed.digest
    if (!entryTag(digest)) {
      log('%s cannot be named by a tag; not shared', digest)
      core.counters.skipped++
      return
    }
    const kind = hints.kind === 'manifest' ? 'manifest' : parsed.kind === 'config' ? 'config' : 'layer'
    const mountFrom = hints.mountFrom !== undefined && this.#sameRegistryRepository(hints.mountFrom) ? hints.mountFrom : undefined
    this.#queue.add({ dir, name, digest, kind, ...(mountFrom ? { mountFrom } : {}) })
  }

  /**
   * Resolves when every queued job has finished (or been dropped or failed), with the stats;
   * `onProgress` is called at the start and after each job. MUST NOT reject; an aborted `signal`
   * drops what is left (counted) and resolves.
   */
  async flush(opts: { signal?: AbortSignal; onProgress?: (p: FlushProgress) => void } = {}): Promise<SharedStats> {
    await this.#queue.drain(opts)
    return this.stats
  }

  /** True when `repository` is a valid repository path (on the tier's registry). */
  #sameRegistryRepository(repository: string): boolean {
    try {
      return parseNormalizedNamed(`${this.registry}/${repository}`).path === repository
    } catch {
      log('ignoring mountFrom %j: not a repository name', repository)
      return false
    }
  }
}
