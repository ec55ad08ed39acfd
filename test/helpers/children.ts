// Child processes for the reliability tests: plain .mjs scripts run with this Node.js against
// the built package (dist/, or BLOBCACHE_DIST), killed by their own pid only, and a seeded
// random source so that a failing round can be replayed (BLOBCACHE_RELIABILITY_SEED).
import { type ChildProcess, spawn } from 'node:child_process'
import { appendFileSync, existsSync, readFileSync } from 'node:fs'
import { resolve } from 'node:path'

/** The built package the children import. */
export const DIST = process.env.BLOBCACHE_DIST ?? resolve(__dirname, '../../dist/index.js')

/** True when the built package exists and exports what the children need. */
export function distReady(...names: string[]): boolean {
  if (!existsSync(DIST)) return false
  const text = readFileSync(DIST, 'utf8')
  return names.every((n) => text.includes(n))
}

/** How a child ended. */
export interface ChildResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  /** Milliseconds from spawn to exit. */
  ms: number
}

/** A running child. */
export interface Child {
  process: ChildProcess
  pid: number
  /** Resolves when the child printed a line containing `text` (rejects if it exits first). */
  waitFor(text: string): Promise<void>
  /** Sends SIGKILL to this child's pid (if still running) and resolves when it is gone. */
  kill(): Promise<ChildResult>
  done: Promise<ChildResult>
}

/** Starts `node script ...args` with the package path in BLOBCACHE_DIST and no DEBUG output. */
export function startChild(script: string, args: string[], env: Record<string, string> = {}): Child {
  const started = Date.now()
  const { DEBUG: _debug, ...inherited } = process.env
  const proc = spawn(process.execPath, [script, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...inherited, BLOBCACHE_DIST: DIST, ...env },
  })
  let stdout = ''
  let stderr = ''
  const watchers: { text: string; resolve: () => void }[] = []
  proc.stdout!.on('data', (d: Buffer) => {
    stdout += d.toString()
    for (const w of watchers.splice(0)) {
      if (stdout.includes(w.text)) w.resolve()
      else watchers.push(w)
    }
  })
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()))
  const done = new Promise<ChildResult>((res, rej) => {
    proc.on('error', rej)
    proc.on('close', (code, signal) => res({ code, signal, stdout, stderr, ms: Date.now() - started }))
  })
  return {
    process: proc,
    pid: proc.pid!,
    done,
    waitFor: (text) =>
      new Promise<void>((res, rej) => {
        if (stdout.includes(text)) return res()
        watchers.push({ text, resolve: res })
        void done.then((r) => rej(new Error(`child exited (${r.code ?? r.signal}) before printing ${JSON.stringify(text)}: ${r.stderr.slice(-2000)}`)))
      }),
    kill: async () => {
      if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid!, 'SIGKILL')
      return done
    },
  }
}

/** A small seeded PRNG (mulberry32): the same seed gives the same rounds. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** The seed of this run: BLOBCACHE_RELIABILITY_SEED, else one derived from the clock (and reported). */
export function runSeed(): number {
  const given = Number(process.env.BLOBCACHE_RELIABILITY_SEED)
  return Number.isInteger(given) && given > 0 ? given : (Date.now() % 2_147_483_647) + 1
}

/**
 * Scale knobs: `name` from the environment (the soak raises them), else `fallback`.
 * BLOBCACHE_SOAK_<NAME>, e.g. BLOBCACHE_SOAK_KILLS=60.
 */
export function knob(name: string, fallback: number): number {
  const v = Number(process.env[`BLOBCACHE_SOAK_${name.toUpperCase()}`])
  return Number.isFinite(v) && v > 0 ? v : fallback
}

/**
 * Records the figures of a suite: one JSON line appended to BLOBCACHE_RELIABILITY_REPORT when it
 * is set (the soak and the Guarantees figures read it); always returned for the test to print.
 */
export function recordFigures(suite: string, figures: Record<string, unknown>): Record<string, unknown> {
  const line = { suite, at: new Date().toISOString(), ...figures }
  const file = process.env.BLOBCACHE_RELIABILITY_REPORT
  if (file) appendFileSync(file, JSON.stringify(line) + '\n')
  return line
}
