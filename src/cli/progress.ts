import type { MultiBar, SingleBar } from 'cli-progress'
import { requireLazily } from '../lazy-require.js'
import type { CopyProgressEvent } from '../copy.js'
import { type CliIO, formatBytes, println } from './io.js'

/** Shows a copy's progress: it receives copyImage's events and is finished once at the end. */
export interface ProgressReporter {
  /** Pass as `CopyOptions.onProgress`. */
  onProgress(e: CopyProgressEvent): void
  /**
   * Ends the display; with `ok` it also says that the manifest was written or, given `present`
   * (its digest), that the destination already had it.
   */
  finish(ok: boolean, present?: string): void
}

/** How progress is shown: bars on a terminal, skopeo-style lines otherwise, or nothing. */
export type ProgressMode = 'bars' | 'lines' | 'quiet'

/** Chooses the reporter for a mode. */
export function createProgress(io: CliIO, mode: ProgressMode): ProgressReporter {
  if (mode === 'quiet') return { onProgress() {}, finish() {} }
  return mode === 'bars' ? new BarProgress(io) : new LineProgress(io)
}

const manifestLine = (present: string | undefined) =>
  present ? `Writing manifest to image destination skipped: ${present} already exists` : 'Writing manifest to image destination'

const label = (e: CopyProgressEvent) => (e.kind === 'config' ? 'config' : 'blob')

/** Skopeo's non-terminal output: one line per blob as it completes. */
class LineProgress implements ProgressReporter {
  constructor(private readonly io: CliIO) {}

  onProgress(e: CopyProgressEvent): void {
    if (e.type === 'done') println(this.io, `Copying ${label(e)} ${e.digest} done`)
    else if (e.type === 'reused') println(this.io, `Copying ${label(e)} ${e.digest} skipped: already exists`)
    else if (e.type === 'skipped') println(this.io, `Copying ${label(e)} ${e.digest} skipped`)
  }

  finish(ok: boolean, present?: string): void {
    if (ok) println(this.io, manifestLine(present))
  }
}

interface BarState {
  bar: SingleBar
  started: number
  total: number
}

/** One cli-progress bar per blob: 12 hex digits of its digest, bytes so far of the total, speed, status. */
class BarProgress implements ProgressReporter {
  readonly #bars = new Map<string, BarState>()
  readonly #multi: MultiBar

  constructor(private readonly io: CliIO) {
    const stream = io.stdout as unknown as NodeJS.WriteStream
    // Loaded here, not at start-up: only a terminal shows bars.
    const { MultiBar: Bars } = requireLazily('cli-progress') as typeof import('cli-progress')
    this.#multi = new Bars({
      stream,
      format: 'Copying {label} {name} [{bar}] {amount} {speed} {status}',
      barsize: 20,
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
      autopadding: true,
      // io.isTTY decided on bars; draw them even if the stream itself does not say it is a TTY.
      noTTYOutput: stream.isTTY !== true,
      notTTYSchedule: 1000,
    })
  }

  onProgress(e: CopyProgressEvent): void {
    const state = this.#barFor(e)
    const now = Date.now()
    if (e.type === 'progress' || e.type === 'start') {
      const bytes = e.bytes ?? 0
      state.bar.update(Math.min(bytes, state.total), {
        amount: `${formatBytes(bytes)} / ${state.total > 0 ? formatBytes(e.size) : '?'}`,
        speed: speed(bytes, now - state.started),
        status: '',
      })
      return
    }
    const status = e.type === 'done' ? 'done' : e.type === 'reused' ? 'skipped: already exists' : 'skipped'
    const bytes = e.type === 'done' ? (e.bytes ?? e.size) : e.size
    state.bar.update(state.total, {
      amount: formatBytes(bytes),
      speed: e.type === 'done' ? speed(bytes, now - state.started) : '',
      status,
    })
  }

  finish(ok: boolean, present?: string): void {
    this.#multi.stop()
    if (ok) println(this.io, manifestLine(present))
  }

  #barFor(e: CopyProgressEvent): BarState {
    const key = `${e.kind}:${e.digest}`
    let state = this.#bars.get(key)
    if (!state) {
      const total = e.size > 0 ? e.size : 1
      const bar = this.#multi.create(total, 0, {
        label: label(e).padEnd(6),
        name: digestHex12(e.digest),
        amount: '',
        speed: '',
        status: '',
      })
      state = { bar, started: Date.now(), total }
      this.#bars.set(key, state)
    }
    return state
  }
}

/** The first 12 hex digits of a digest, as skopeo's progress bars show it. */
function digestHex12(digest: string): string {
  return digest.slice(digest.indexOf(':') + 1, digest.indexOf(':') + 13)
}

/** `sha256:0123456789ab`: the algorithm and the first 12 hex digits. */
export function shortDigest(digest: string): string {
  const colon = digest.indexOf(':')
  return colon < 0 ? digest.slice(0, 12) : digest.slice(0, colon + 13)
}

function speed(bytes: number, ms: number): string {
  if (ms <= 0 || bytes <= 0) return ''
  return `${formatBytes(Math.round((bytes * 1000) / ms))}/s`
}
