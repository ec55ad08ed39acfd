import type { Writable } from 'node:stream'
import { InvalidArgumentError } from 'commander'
import { type Platform, parsePlatform } from '../manifest.js'

/**
 * Where the CLI talks to: its two output streams, whether stdout is a terminal (progress bars
 * instead of plain lines) and the environment. `main()` takes one so tests can capture output.
 */
export interface CliIO {
  stdout: Writable
  stderr: Writable
  /** True when stdout is a terminal; chooses progress bars over plain lines. */
  isTTY: boolean
  env: NodeJS.ProcessEnv
}

/** The CliIO of the running process. */
export function processIO(): CliIO {
  return { stdout: process.stdout, stderr: process.stderr, isTTY: process.stdout.isTTY === true, env: process.env }
}

/** What every command needs from one run: the streams, the run's signal and its exit code. */
export interface RunContext {
  io: CliIO
  /** Aborted on the first Ctrl-C. */
  signal: AbortSignal
  /** The exit code `main()` returns; commands set 1 on failure. */
  exitCode: number
}

/** Writes one line to stdout. */
export function println(io: CliIO, line = ''): void {
  io.stdout.write(line + '\n')
}

/** Writes `value` as indented JSON and a newline to stdout. */
export function printJSON(io: CliIO, value: unknown, indent = 2): void {
  io.stdout.write(JSON.stringify(value, null, indent) + '\n')
}

/** The message of an error (or anything thrown) folded into one line. */
export function describeError(err: unknown): string {
  const message = err instanceof Error ? err.message || err.name : String(err)
  return message.replace(/\s*\n\s*/g, ' ').trim()
}

/**
 * Runs one command's work. On failure it writes exactly one line,
 * `blobcache: <what>: <cause>`, to stderr and sets the exit code to 1.
 */
export async function attempt(ctx: RunContext, what: string, work: () => Promise<void>): Promise<void> {
  try {
    await work()
  } catch (err) {
    ctx.io.stderr.write(`blobcache: ${what}: ${describeError(err)}\n`)
    ctx.exitCode = 1
  }
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB']

/** Formats a byte count for people: `512 B`, `1.5 KiB`, `12.3 MiB`. */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n) || n < 0) return '?'
  let i = 0
  let v = n
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024
    i++
  }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)} ${UNITS[i]}`
}

/** Formats milliseconds for people: `850 ms`, `2.4 s`. */
export function formatDuration(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`
}

const SIZE_FACTORS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }

/**
 * Parses a size such as `500M`, `1G`, `1.5GiB` or `4096` into bytes. K, M, G and T (with an
 * optional `i`, `B` or `iB`) are powers of 1024. Throws commander's InvalidArgumentError, so a
 * bad value is a usage error.
 */
export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(s.trim())
  if (!m) throw new InvalidArgumentError(`expected a size such as 500M or 1G, got ${JSON.stringify(s)}`)
  return Math.floor(Number(m[1]) * SIZE_FACTORS[m[2].toLowerCase()])
}

const DURATION_FACTORS: Record<string, number> = {
  ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000,
}

/**
 * Parses a duration such as `7d`, `12h`, `1h30m`, `90s` or `500ms` into milliseconds. Throws
 * commander's InvalidArgumentError, so a bad value is a usage error.
 */
export function parseDuration(s: string): number {
  const text = s.trim()
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/gy
  let total = 0
  let end = 0
  for (let m = re.exec(text); m; m = re.exec(text)) {
    total += Number(m[1]) * DURATION_FACTORS[m[2]]
    end = re.lastIndex
  }
  if (text === '' || end !== text.length) {
    throw new InvalidArgumentError(`expected a duration such as 7d, 12h or 1h30m, got ${JSON.stringify(s)}`)
  }
  return Math.round(total)
}

/** Parses a non-negative integer option value; a bad one is a usage error. */
export function parseCount(s: string): number {
  if (!/^\d+$/.test(s.trim())) throw new InvalidArgumentError(`expected a whole number, got ${JSON.stringify(s)}`)
  return Number(s.trim())
}

/** Parses `--platform os/arch[/variant]` for commander; a bad value is a usage error. */
export function platformArg(value: string): Platform {
  try {
    return parsePlatform(value)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}
