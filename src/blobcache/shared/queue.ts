// The write-behind queue of the shared tier: bounded (beyond `maxQueue` waiting jobs new ones
// are dropped, counted, with one warning), run `concurrency` at a time (a job whose entry is
// written gives its slot back while it waits to check the entry again), one job per digest at a
// time, deduplicated by digest (a job waiting for a digest absorbs later requests for it; a job
// whose notes are what this process last wrote for the digest does nothing), each retried with
// backoff when it failed for a reason that may pass. Nothing here ever rejects.
import { setTimeout as sleep } from 'node:timers/promises'
import debug from 'debug'
import type { Digest } from '../../digest.js'
import { isTransient } from '../../registry/retry.js'
import { NotConvergedError, type TierCore, reason } from './core.js'
import { formatEntryManifest } from './format.js'
import { type WriteJob, localEntry, writeEntry } from './write.js'

const log = debug('blobcache:blobcache:shared:queue')

/** Retries of a failed job (after its first attempt). */
export const JOB_RETRIES = 3

/** Progress of the write-behind queue, counted over the tier's life. */
export interface QueueProgress {
  /** Jobs finished: written, skipped, failed or dropped. */
  done: number
  /** Jobs accepted. */
  total: number
  /** Bytes uploaded. */
  bytes: number
}

/** Settings of a {@link WriteQueue}. */
export interface WriteQueueOptions {
  concurrency: number
  maxQueue: number
}

/** See the module comment. */
export class WriteQueue {
  readonly #core: TierCore
  readonly #opts: WriteQueueOptions
  /** Jobs waiting, by digest, in the order they came. */
  readonly #waiting = new Map<Digest, WriteJob>()
  readonly #running = new Map<Digest, AbortController>()
  /**
   * Running jobs that hold one of the `concurrency` slots. A job gives its slot back once its
   * entry is written and it only waits to check it again (see write.ts), so those waits do not
   * hold up the uploads behind it.
   */
  #active = 0
  /** Per digest, the entry (serialized) this process last brought into the tier. */
  readonly #written = new Map<Digest, string>()
  readonly #idle = new Set<() => void>()
  readonly #listeners = new Set<(p: QueueProgress) => void>()
  #accepted = 0
  #finished = 0
  #overflowWarned = false

  constructor(core: TierCore, opts: WriteQueueOptions) {
    this.#core = core
    this.#opts = { concurrency: Math.max(1, opts.concurrency), maxQueue: Math.max(0, opts.maxQueue) }
  }

  /** Jobs waiting or running. */
  get pending(): number {
    return this.#waiting.size + this.#running.size
  }

  /** Jobs finished and accepted so far, and bytes uploaded. */
  get progress(): QueueProgress {
    return { done: this.#finished, total: this.#accepted, bytes: this.#core.counters.bytesUploaded }
  }

  /** Adds a job (see the module comment); returns at once. */
  add(job: WriteJob): void {
    const waiting = this.#waiting.get(job.digest)
    if (waiting) {
      // the same blob again: one job does for both, with the latest location and hints
      waiting.dir = job.dir
      waiting.name = job.name
      if (job.kind === 'manifest') waiting.kind = 'manifest'
      waiting.mountFrom = job.mountFrom ?? waiting.mountFrom
      return
    }
    if (this.#waiting.size >= this.#opts.maxQueue) {
      this.#core.counters.dropped++
      if (!this.#overflowWarned) {
        this.#overflowWarned = true
        this.#core.warn(`shared cache ${this.#core.name}: more than ${this.#opts.maxQueue} blobs waiting to be pushed; dropping the rest`)
      }
      return
    }
    this.#waiting.set(job.digest, { ...job })
    this.#accepted++
    this.#pump()
  }

  /**
   * Resolves when no job is waiting or running. `onProgress` hears of every job that finishes
   * meanwhile (and once at the start). An abort of `signal` drops what is left (counted) and
   * resolves once the running jobs have stopped.
   */
  async drain(opts: { signal?: AbortSignal; onProgress?: (p: QueueProgress) => void } = {}): Promise<void> {
    const { signal, onProgress } = opts
    if (onProgress) {
      this.#listeners.add(onProgress)
      this.#notify(onProgress)
    }
    const onAbort = () => this.#dropAll()
    try {
      if (signal?.aborted) this.#dropAll()
      else signal?.addEventListener('abort', onAbort, { once: true })
      if (this.pending > 0) await new Promise<void>((resolve) => this.#idle.add(resolve))
    } finally {
      signal?.removeEventListener('abort', onAbort)
      if (onProgress) this.#listeners.delete(onProgress)
    }
  }

  #notify(listener: (p: QueueProgress) => void): void {
    try {
      listener(this.progress)
    } catch (err) {
      log('progress callback failed: %s', reason(err))
    }
  }

  /** Drops every waiting job and stops the running ones (each counted as dropped). */
  #dropAll(): void {
    const n = this.#waiting.size
    this.#core.counters.dropped += n
    this.#finished += n
    this.#waiting.clear()
    for (const controller of this.#running.values()) controller.abort(new Error('flush aborted'))
    if (n > 0) for (const l of this.#listeners) this.#notify(l)
    this.#settle()
  }

  #pump(): void {
    for (const [digest, job] of this.#waiting) {
      if (this.#active >= this.#opts.concurrency) break
      if (this.#running.has(digest)) continue // one job per digest at a time
      this.#waiting.delete(digest)
      const controller = new AbortController()
      this.#running.set(digest, controller)
      this.#active++
      let holding = true
      const release = () => {
        if (!holding) return
        holding = false
        this.#active--
      }
      void this.#run(job, controller.signal, () => {
        release()
        this.#pump()
      }).finally(() => {
        release()
        this.#running.delete(digest)
        this.#finished++
        for (const l of this.#listeners) this.#notify(l)
        this.#pump()
        this.#settle()
      })
    }
  }

  #settle(): void {
    if (this.#waiting.size === 0) this.#overflowWarned = false
    if (this.pending > 0) return
    for (const resolve of this.#idle) resolve()
    this.#idle.clear()
  }

  /** Runs one job with its retries and counts its outcome. Never rejects. */
  async #run(job: WriteJob, signal: AbortSignal, releaseSlot: () => void): Promise<void> {
    const counters = this.#core.counters
    for (let attempt = 0; ; attempt++) {
      if (signal.aborted) return void counters.dropped++
      if (this.#core.writesDown) {
        // the breaker's warning has been given; do not ask the tier
        log('%s: the tier is down; not pushed', job.digest)
        return void counters.failed++
      }
      try {
        const ours = await localEntry(job)
        if (!ours) {
          log('%s: %s is gone from %s; nothing to push', job.digest, job.name, job.dir)
          return void counters.dropped++
        }
        const key = formatEntryManifest(ours).toString('utf8')
        if (this.#written.get(job.digest) === key) return void counters.skipped++
        const outcome = await writeEntry(this.#core, job, ours, signal, releaseSlot)
        this.#written.set(job.digest, key)
        if (outcome === 'merged') counters.notesMerged++
        else counters[outcome]++
        return
      } catch (err) {
        if (signal.aborted) return void counters.dropped++
        const tripped = this.#core.failed(`pushing ${job.name} (attempt ${attempt + 1})`, err, 'write')
        if (tripped || attempt >= JOB_RETRIES || !worthRetrying(err)) {
          counters.failed++
          if (!tripped) this.#core.warnLimited('push', `shared cache ${this.#core.name}: could not push ${job.digest} (${reason(err)})`)
          return
        }
        const ceiling = Math.min(250 * 2 ** attempt, 4000)
        await sleep(ceiling / 2 + (Math.random() * ceiling) / 2, undefined, { signal }).catch(() => {})
      }
    }
  }
}

/**
 * True when another attempt of a job may succeed: a transient failure, a write that did not
 * stick, or a manifest refused for a blob the registry did not find. The last happens when
 * several writers commit the same blob at once: distribution rewrites the blob's link file in
 * place, and a manifest checked meanwhile reads it empty.
 */
function worthRetrying(err: unknown): boolean {
  if (isTransient(err) || err instanceof NotConvergedError) return true
  const errors = (err as { errors?: unknown }).errors
  return Array.isArray(errors) && errors.some((e: { code?: unknown }) => e?.code === 'MANIFEST_BLOB_UNKNOWN' || e?.code === 'BLOB_UNKNOWN')
}
