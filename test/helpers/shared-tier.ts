// Helpers of the shared-cache-tier tests: "machines" (the built CLI, bin/blobcache, as separate
// processes, each with its own local cache directory), an origin whose blobs can be made
// unreachable (a fault proxy answering 404 to every blob request, manifests still served), and
// plain HTTP reads of what the tier holds: its entry manifests (`sha256-<hex>` tags), blobs and
// the files under the registry's storage.
import { type ChildProcess, spawn } from 'node:child_process'
import { readFile, readdir } from 'node:fs/promises'
import { type IncomingMessage, request } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { expect } from 'vitest'
import { type Digest, digestHex, digestOf } from '../../src/digest.js'
import type { FaultProxy, FaultRule, ProxiedRequest } from './fault-proxy.js'
import type { SharedStats } from '../../src/blobcache/shared/tier.js'
import { CLI_JS, cliBuilt, cliCommand } from './built-cli.js'

export { cliBuilt }

/** The built CLI the machines run. */
export const CLI = CLI_JS

/** How a machine's copy ended. */
export interface MachineExit {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  /** The `--json` summary, when stdout held one. */
  json?: CopyJson
}

/** The parts of `copy --json` these tests read. */
export interface CopyJson {
  manifestDigest: string
  blobs: { copied: number; reused: number }
  cache?: { hits: number; misses: number; errors: number; shared?: SharedJson }
  shared?: SharedJson
}

/** The shared tier's stats as `copy --json` prints them. */
export type SharedJson = SharedStats

/** A running machine. */
export interface Machine {
  process: ChildProcess
  pid: number
  done: Promise<MachineExit>
  /** SIGKILL to its pid if it still runs; resolves how it ended. */
  kill(): Promise<MachineExit>
}

/** Starts `blobcache ...args` (bin/blobcache; with no DEBUG output and an empty auth-file environment). */
export function startMachine(args: string[], env: Record<string, string> = {}): Machine {
  const { DEBUG: _debug, REGISTRY_AUTH_FILE: _auth, ...inherited } = process.env
  const proc = spawn(...cliCommand(args), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...inherited, ...env } })
  let stdout = ''
  let stderr = ''
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()))
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()))
  const done = new Promise<MachineExit>((res, rej) => {
    proc.on('error', rej)
    proc.on('close', (code, signal) => {
      let json: CopyJson | undefined
      try {
        json = stdout.trim() ? (JSON.parse(stdout) as CopyJson) : undefined
      } catch {
        json = undefined
      }
      res({ code, signal, stdout, stderr, json })
    })
  })
  return {
    process: proc,
    pid: proc.pid!,
    done,
    kill: async () => {
      if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid!, 'SIGKILL')
      return done
    },
  }
}

/** Runs one machine's command to its end (killed by pid after `timeoutMs`). */
export async function runMachine(args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<MachineExit> {
  const m = startMachine(args, env)
  const timer = setTimeout(() => void m.kill(), timeoutMs)
  try {
    return await m.done
  } finally {
    clearTimeout(timer)
  }
}

/** The shared-tier stats of a `--json` summary (top level `shared`, or `cache.shared`). */
export function sharedStatsOf(exit: MachineExit): SharedJson {
  const s = exit.json?.shared ?? exit.json?.cache?.shared
  if (!s) throw new Error(`no shared stats in the --json output: ${exit.stdout.slice(0, 2000)}\nstderr: ${exit.stderr.slice(-2000)}`)
  return s
}

/** The lines of stderr that are warnings (`blobcache: warning: ...`). */
export function warningLines(stderr: string): string[] {
  return stderr.split('\n').filter((l) => /warning/i.test(l))
}

/** Asserts a copy ended well: exit 0 (with stderr in the failure message). */
export function expectSuccess(exit: MachineExit): void {
  expect(exit.code, `exit ${exit.code} ${exit.signal ?? ''}\nstderr:\n${exit.stderr}`).toBe(0)
}

/** An image read back from an OCI layout (its only, or first, manifest). */
export interface LayoutImage {
  manifestDigest: Digest
  manifest: { config: { digest: Digest; size: number }; layers: { digest: Digest; size: number; mediaType: string }[] }
  config: { rootfs: { diff_ids: Digest[] } }
  /** Every blob the manifest names (config and layers), by digest, checked to hash to it. */
  blobs: Map<Digest, Buffer>
}

/** Reads the image of the OCI layout `dir`, checking that every blob hashes to its name. */
export async function readLayout(dir: string): Promise<LayoutImage> {
  const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')) as { manifests: { digest: Digest }[] }
  const blob = async (d: Digest) => {
    const bytes = await readFile(join(dir, 'blobs', 'sha256', digestHex(d)))
    expect(digestOf(bytes)).toBe(d)
    return bytes
  }
  const manifestDigest = index.manifests[0].digest
  const manifest = JSON.parse((await blob(manifestDigest)).toString('utf8')) as LayoutImage['manifest']
  const blobs = new Map<Digest, Buffer>()
  for (const d of [manifest.config, ...manifest.layers]) {
    const bytes = await blob(d.digest)
    expect(bytes.length).toBe(d.size)
    blobs.set(d.digest, bytes)
  }
  const config = JSON.parse(blobs.get(manifest.config.digest)!.toString('utf8')) as LayoutImage['config']
  return { manifestDigest, manifest, config, blobs }
}

/** The fault rule that makes every blob of the origin unreachable (404 BLOB_UNKNOWN); manifests pass. */
export const BLOBS_GONE: FaultRule = {
  path: /\/blobs\/sha\d+:/,
  fault: { kind: 'status', status: 404, body: JSON.stringify({ errors: [{ code: 'BLOB_UNKNOWN', message: 'blob unknown to registry' }] }) },
}

/** The blob requests (any method, not uploads) a proxy saw. */
export function blobRequests(proxy: FaultProxy): ProxiedRequest[] {
  return proxy.requests.filter((r) => /\/blobs\/sha\d+:/.test(r.path))
}

/** Where the registry with storage under `registryDir` keeps the bytes of `digest`. */
export function blobDataPath(registryDir: string, digest: Digest): string {
  const hex = digestHex(digest)
  return join(registryDir, 'storage', 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex, 'data')
}

/** The tags of repository `repo` in the registry storage under `registryDir` (read from disk). */
export async function storedTags(registryDir: string, repo: string): Promise<string[]> {
  const dir = join(registryDir, 'storage', 'docker', 'registry', 'v2', 'repositories', repo, '_manifests', 'tags')
  return (await readdir(dir).catch(() => [] as string[])).sort()
}

/** One plain HTTP(S) answer, body read whole. */
export interface HttpAnswer {
  status: number
  headers: IncomingMessage['headers']
  body: Buffer
}

/** Options of {@link httpRequest}. */
export interface HttpOptions {
  method?: string
  headers?: Record<string, string>
  body?: Buffer
  /** HTTPS without certificate verification. */
  tls?: boolean
  /** Basic credentials. */
  auth?: { username: string; password: string }
}

/** A plain HTTP (or unverified HTTPS) request to `host` (`127.0.0.1:port`), body read whole. */
export function httpRequest(host: string, path: string, opts: HttpOptions = {}): Promise<HttpAnswer> {
  const [hostname, port] = [host.slice(0, host.lastIndexOf(':')), Number(host.slice(host.lastIndexOf(':') + 1))]
  const headers: Record<string, string> = { ...opts.headers }
  if (opts.auth) headers.authorization = 'Basic ' + Buffer.from(`${opts.auth.username}:${opts.auth.password}`).toString('base64')
  if (opts.body) headers['content-length'] = String(opts.body.length)
  return new Promise((res, rej) => {
    const onResponse = (r: IncomingMessage) => {
      const chunks: Buffer[] = []
      r.on('data', (c: Buffer) => chunks.push(c))
      r.on('end', () => res({ status: r.statusCode ?? 0, headers: r.headers, body: Buffer.concat(chunks) }))
      r.on('error', rej)
    }
    const options = { hostname, port, path, method: opts.method ?? 'GET', headers }
    const req = opts.tls ? httpsRequest({ ...options, rejectUnauthorized: false }, onResponse) : request(options, onResponse)
    req.on('error', rej)
    req.end(opts.body)
  })
}

/** The media type of OCI image manifests (our entries are ones). */
export const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json'

/** The tier entry of `digest` as JSON (undefined when the tag is absent), fetched with a plain GET. */
export async function tierEntry(host: string, repo: string, digest: Digest, opts: HttpOptions = {}): Promise<TierEntry | undefined> {
  const r = await httpRequest(host, `/v2/${repo}/manifests/sha256-${digestHex(digest)}`, { ...opts, headers: { accept: OCI_MANIFEST } })
  if (r.status === 404) return undefined
  if (r.status !== 200) throw new Error(`GET entry of ${digest}: HTTP ${r.status} ${r.body.toString('utf8').slice(0, 500)}`)
  return { bytes: r.body, json: JSON.parse(r.body.toString('utf8')) as TierEntry['json'] }
}

/** A tier entry manifest: its bytes and their parse. */
export interface TierEntry {
  bytes: Buffer
  json: {
    schemaVersion: number
    mediaType: string
    artifactType: string
    config: { mediaType: string; digest: string; size: number; data?: string }
    layers: { mediaType: string; digest: string; size: number }[]
    annotations?: Record<string, string>
  }
}

/**
 * Stores `bytes` as a blob of `repo` with no manifest naming it (POST, then PUT `?digest=`):
 * what garbage collection is expected to remove.
 */
export async function pushOrphanBlob(host: string, repo: string, bytes: Buffer, opts: HttpOptions = {}): Promise<Digest> {
  const digest = digestOf(bytes)
  const start = await httpRequest(host, `/v2/${repo}/blobs/uploads/`, { ...opts, method: 'POST', body: Buffer.alloc(0) })
  if (start.status !== 202) throw new Error(`starting an upload: HTTP ${start.status}`)
  const location = new URL(String(start.headers.location), `http://${host}`)
  location.searchParams.set('digest', digest)
  const put = await httpRequest(host, location.pathname + location.search, {
    ...opts,
    method: 'PUT',
    headers: { 'content-type': 'application/octet-stream' },
    body: bytes,
  })
  if (put.status !== 201) throw new Error(`finishing an upload: HTTP ${put.status} ${put.body.toString('utf8')}`)
  return digest
}

/** Polls `check` every 5 ms until it is true (rejects after `timeoutMs`). */
export async function waitUntil(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(5)
  }
}
