// The shared cache tier in the CLI: the --shared-* flags of `copy`, the one SharedTier both of
// its cache wrappers use, and the flush after the copy, with its progress line and its warnings
// on stderr. Nothing here can change a run's exit code except a malformed flag (usage, 2).
import type { Command } from 'commander'
import { SharedTier, type SharedStats } from '../blobcache/index.js'
import { isImageError } from '../errors.js'
import { type CliIO, describeError, formatBytes } from './io.js'
import { addRegistryFlags, registryOptions } from './registry-flags.js'

/** The parsed --shared-* flags. */
export interface SharedCacheFlags {
  sharedCache?: string
  sharedTlsVerify?: boolean
  sharedCreds?: string
  sharedAuthfile?: string
  sharedCertDir?: string
  sharedNoCreds?: boolean
  sharedRegistryToken?: string
}

/**
 * Adds `--shared-cache docker://host/repo` and its registry flags (`--shared-tls-verify`,
 * `--shared-creds`, `--shared-authfile`, `--shared-cert-dir`) to a command.
 */
export function addSharedCacheFlags(cmd: Command): Command {
  cmd.option(
    '--shared-cache <docker://host/repo>',
    'second cache tier behind --blob-cache: a registry repository several machines share (best effort, never fails a copy)',
  )
  return addRegistryFlags(cmd, 'shared-', 'shared cache')
}

/** Why the --shared-* flags cannot be used as given (a usage error), or undefined. */
export function sharedFlagsProblem(flags: SharedCacheFlags & { blobCache?: string }): string | undefined {
  if (!flags.sharedCache) {
    const stray = [flags.sharedTlsVerify, flags.sharedCreds, flags.sharedAuthfile, flags.sharedCertDir, flags.sharedNoCreds, flags.sharedRegistryToken].some(
      (v) => v !== undefined,
    )
    return stray ? 'the --shared-* registry flags need --shared-cache' : undefined
  }
  if (!flags.blobCache) return '--shared-cache needs --blob-cache'
  if (!flags.sharedCache.startsWith('docker://')) {
    return `--shared-cache must name a registry repository, docker://host[:port]/repo, not ${JSON.stringify(flags.sharedCache)}`
  }
  return undefined
}

/**
 * Shows what the shared tier reports during a run on stderr: each warning as one line
 * (`blobcache: warning: ...`), and the flush's progress line (`shared cache: 3 of 7 blobs pushed
 * (12.3 MiB)`; at the end also how many failed or were dropped), rewritten in place on a
 * terminal and otherwise written once at the end.
 */
export class SharedReporter {
  readonly #io: CliIO
  readonly #tty: boolean
  readonly #quiet: boolean
  /** The progress line now on the terminal, if any. */
  #line = ''

  /** `quiet`: no progress line (warnings are still written). */
  constructor(io: CliIO, quiet: boolean) {
    this.#io = io
    this.#tty = (io.stderr as { isTTY?: boolean }).isTTY === true
    this.#quiet = quiet
  }

  /** Writes one warning line (clearing a progress line first). */
  warn(message: string): void {
    const text = message.replace(/\s*\n\s*/g, ' ').trim()
    this.#io.stderr.write(`${this.#clear()}blobcache: warning: ${text}\n${this.#line}`)
  }

  /** Waits for the tier's uploads, showing their progress; resolves its counts. Never rejects. */
  async flush(tier: SharedTier, signal?: AbortSignal): Promise<SharedStats> {
    let last: { done: number; total: number; bytes: number } | undefined
    let stats: SharedStats
    try {
      stats = await tier.flush({
        signal,
        onProgress: (p) => {
          last = p
          if (this.#tty && !this.#quiet) {
            const line = progressLine(p.done, p.total, p.bytes)
            this.#io.stderr.write(`${this.#clear()}${line}`)
            this.#line = line
          }
        },
      })
    } catch (err) {
      // flush is documented never to reject; should it, the copy's outcome still stands
      this.warn(`shared cache ${tier.name}: ${describeError(err)}`)
      stats = tier.stats
    }
    const clear = this.#clear()
    this.#line = ''
    if (!this.#quiet && last && last.total > 0) {
      const line = progressLine(last.done, last.total, last.bytes)
      const missed = stats.failed + stats.dropped
      this.#io.stderr.write(`${clear}${line}${missed > 0 ? `, ${missed} not pushed (see the warnings)` : ''}\n`)
    }
    else if (clear) this.#io.stderr.write(clear)
    return stats
  }

  /** The control sequence that erases the progress line on a terminal ('' when there is none). */
  #clear(): string {
    return this.#tty && this.#line !== '' ? '\r\x1b[K' : ''
  }
}

/** `shared cache: 3 of 7 blobs pushed (12.3 MiB)`. */
export function progressLine(done: number, total: number, bytes: number): string {
  return `shared cache: ${done} of ${total} blob${total === 1 ? '' : 's'} pushed (${formatBytes(bytes)})`
}

/**
 * Makes the one SharedTier of a `copy` run from its flags (undefined without --shared-cache),
 * its warnings going to `reporter`. `--authfile` applies when --shared-authfile is not given.
 * Returns a usage problem (a string) for a name the tier refuses.
 */
export function openSharedTier(
  flags: SharedCacheFlags & { authfile?: string },
  reporter: SharedReporter,
): SharedTier | string | undefined {
  if (!flags.sharedCache) return undefined
  const registry = registryOptions(flags as unknown as Record<string, unknown>, 'shared', flags.authfile)
  try {
    return new SharedTier(flags.sharedCache, { ...(registry ? { registry } : {}), onWarning: (m) => reporter.warn(m) })
  } catch (err) {
    if (isImageError(err, 'REFERENCE_INVALID')) return `--shared-cache: ${describeError(err)}`
    throw err
  }
}
