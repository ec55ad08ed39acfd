// Runs the real skopeo (and other programs) for interop tests. skopeo refuses to copy without a
// signature policy, and /etc/containers/policy.json may be missing on a fresh machine, so every
// call gets --insecure-policy.
import { execFile } from 'node:child_process'

/** What a finished program printed and how it exited. */
export interface RunResult {
  stdout: string
  stderr: string
  /** Exit code; non-zero when the program failed (or was killed). */
  code: number
}

/** Options of {@link run} and {@link skopeo}. */
export interface RunOptions {
  /** Working directory. Default: the current one. */
  cwd?: string
  /** Extra environment variables (merged over process.env). */
  env?: NodeJS.ProcessEnv
  /** Kill the program after this many ms. Default 120 000. */
  timeout?: number
  /** Reject (instead of resolving with `code`) when the program exits non-zero. Default false. */
  check?: boolean
  signal?: AbortSignal
}

/**
 * Runs `cmd args` without a shell and resolves with its output and exit code. A non-zero exit
 * resolves too (with `code`), unless `check` is set; a program that cannot be started rejects.
 */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ? { ...process.env, ...opts.env } : process.env,
        timeout: opts.timeout ?? 120_000,
        maxBuffer: 64 << 20,
        encoding: 'utf8',
        signal: opts.signal,
      },
      (err, stdout, stderr) => {
        if (err && typeof err.code === 'string') {
          // ENOENT, ABORT_ERR, maxBuffer: the program could not be run to completion
          reject(err)
          return
        }
        // a number is the exit code; null means it was killed by a signal (timeout)
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0
        const result = { stdout, stderr, code }
        if (code !== 0 && opts.check) {
          reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr.trim() || stdout.trim()}`))
          return
        }
        resolve(result)
      },
    )
  })
}

const NEEDS_POLICY = new Set(['copy', 'sync'])

/**
 * Runs `skopeo args`. Commands that consult the signature policy (copy, sync) get
 * `--insecure-policy` (accept anything; /etc/containers/policy.json may be missing on a fresh
 * machine) unless the caller passed a policy flag already.
 */
export function skopeo(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const command = args.find((a) => !a.startsWith('-'))
  const hasPolicy = args.some((a) => a === '--insecure-policy' || a === '--policy' || a.startsWith('--policy='))
  const global = command && NEEDS_POLICY.has(command) && !hasPolicy ? ['--insecure-policy'] : []
  return run('skopeo', [...global, ...args], opts)
}

/** Like {@link skopeo}, but rejects with skopeo's stderr when it exits non-zero. */
export function skopeoOk(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return skopeo(args, { ...opts, check: true })
}

/** `skopeo inspect NAME` parsed (Digest, Layers, Architecture, …); rejects when skopeo fails. */
export async function skopeoInspect(name: string, opts: RunOptions = {}): Promise<SkopeoInspect> {
  const { stdout } = await skopeoOk(['inspect', name], opts)
  return JSON.parse(stdout) as SkopeoInspect
}

/** `skopeo inspect --raw NAME`: the manifest bytes exactly as stored; rejects when skopeo fails. */
export async function skopeoInspectRaw(name: string, opts: RunOptions = {}): Promise<Buffer> {
  // `--raw` prints the manifest bytes unchanged; read them as latin1 to keep bytes exact.
  return new Promise((resolve, reject) => {
    execFile(
      'skopeo',
      ['inspect', '--raw', name],
      { encoding: 'buffer', maxBuffer: 64 << 20, timeout: opts.timeout ?? 120_000, signal: opts.signal },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`skopeo inspect --raw ${name}: ${stderr.toString().trim() || err.message}`))
        else resolve(stdout)
      },
    )
  })
}

/** `skopeo inspect --config NAME` parsed: the image config. */
export async function skopeoInspectConfig(name: string, opts: RunOptions = {}): Promise<Record<string, unknown>> {
  const { stdout } = await skopeoOk(['inspect', '--config', name], opts)
  return JSON.parse(stdout) as Record<string, unknown>
}

/** The fields of `skopeo inspect` output the tests look at. */
export interface SkopeoInspect {
  Name?: string
  Digest: string
  Architecture: string
  Os: string
  Layers: string[]
  LayersData?: { MIMEType: string; Digest: string; Size: number }[]
  [key: string]: unknown
}
