// Starts the real CNCF distribution registry (Debian's `docker-registry`) on 127.0.0.1 on a free
// port with its own temporary storage, optionally behind htpasswd basic auth or bearer-token auth
// (see token-server.ts), and stops it by its process id. A registry can be halted and restarted
// on the same port and storage, and `docker-registry garbage-collect` run on that storage while
// it is halted.
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { type IncomingMessage, get } from 'node:http'
import { get as httpsGet } from 'node:https'
import { type AddressInfo, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { promisify } from 'node:util'
import { docker } from '../../src/transports/docker.js'
import type { ImageReference, RegistryOptions, SystemContext } from '../../src/types.js'
import { type TokenServer, type TokenServerOptions, startTokenServer } from './token-server.js'

const exec = promisify(execFile)

/** Options of {@link startRegistry}. Each field documents its default. */
export interface TestRegistryOptions {
  /** `none`, `htpasswd` (basic auth, bcrypt entries) or `token` (bearer tokens). Default `none`. */
  auth?: 'none' | 'htpasswd' | 'token'
  /** Users for htpasswd or the token server. Default `{ alice: 'wonderland' }`. */
  users?: Record<string, string>
  /** Further token-server options (auth `token` only). */
  token?: Omit<TokenServerOptions, 'dir' | 'users'>
  /** Serve HTTPS with a fresh self-signed certificate for 127.0.0.1 (`certPath`). Default false. */
  tls?: boolean
  /**
   * With `tls`: require a client certificate signed by a fresh CA of its own; `clientCert` and
   * `clientKey` are one. Default false.
   */
  clientCerts?: boolean
}

/** A running registry. */
export interface TestRegistry {
  /** `127.0.0.1:<port>`, the registry part of image names. */
  host: string
  port: number
  /** Its storage and config directory. */
  dir: string
  users: Record<string, string>
  /** The token server, with auth `token`. */
  tokenServer?: TokenServer
  /** The self-signed certificate, with `tls`. */
  certPath?: string
  /** A client certificate (PEM) and its key the registry accepts, with `clientCerts`. */
  clientCert?: string
  clientKey?: string
  /** The process id of the running registry (a new one after {@link TestRegistry.restart}). */
  readonly pid: number
  /** Its config file (what `serve` and `garbage-collect` read). */
  configPath: string
  /** Whether the registry process is running. */
  readonly running: boolean
  /**
   * Stops the registry process (SIGTERM to its pid, SIGKILL after 5 s) and keeps its storage,
   * port and token server, so that {@link TestRegistry.restart} can bring it back. No-op when
   * it is not running.
   */
  halt(): Promise<void>
  /**
   * Starts the registry again on the same port, storage and config (halting it first if it is
   * running); resolves once `GET /v2/` answers.
   */
  restart(): Promise<void>
  /**
   * Runs `docker-registry garbage-collect [--delete-untagged] [--dry-run] <config>` on the
   * storage. The registry MUST be halted (the garbage collector assumes nobody writes meanwhile):
   * rejects otherwise. Resolves its combined output; rejects when it exits non-zero.
   */
  garbageCollect(opts?: { deleteUntagged?: boolean; dryRun?: boolean }): Promise<string>
  /** Stops the registry (and token server) and removes its storage. */
  stop(): Promise<void>
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo
      server.close(() => resolve(port))
    })
  })
}

/** GET `url`, resolving its status (0 when the connection fails); https without verifying. */
export function httpStatus(url: string, client?: { cert: string; key: string }): Promise<number> {
  return new Promise((resolve) => {
    const onResponse = (res: IncomingMessage) => {
      res.resume()
      resolve(res.statusCode ?? 0)
    }
    const req = url.startsWith('https:') ? httpsGet(url, { rejectUnauthorized: false, ...client }, onResponse) : get(url, onResponse)
    req.on('error', () => resolve(0))
    req.setTimeout(2000, () => req.destroy())
  })
}

/** A `docker-registry serve` process that answered `GET /v2/`. */
interface Served {
  proc: ChildProcess
  exited: Promise<number>
}

/**
 * Spawns `docker-registry serve config` and waits up to 15 s for `url` to answer 200 or 401.
 * Rejects (after killing the process) when it does not; the error carries its stderr tail.
 */
async function serve(config: string, url: string, client?: { cert: string; key: string }): Promise<Served> {
  const proc = spawn('docker-registry', ['serve', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  proc.stderr?.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)))
  const exited = new Promise<number>((resolve) => proc.once('exit', (code) => resolve(code ?? -1)))
  const deadline = Date.now() + 15_000
  let status = 0
  while (Date.now() < deadline && proc.exitCode === null) {
    status = await httpStatus(url, client)
    if (status === 200 || status === 401) return { proc, exited }
    await sleep(50)
  }
  if (proc.exitCode === null) {
    proc.kill('SIGKILL')
    await exited
  }
  throw Object.assign(new Error(`docker-registry did not start (status ${status}): ${stderr.trim()}`), { stderr })
}

/** Stops a served registry by its pid: SIGTERM, SIGKILL after 5 s. */
async function halt(served: Served): Promise<void> {
  const { proc, exited } = served
  if (proc.exitCode !== null || proc.signalCode !== null) return
  const pid = proc.pid!
  process.kill(pid, 'SIGTERM')
  const timer = setTimeout(() => proc.exitCode === null && proc.signalCode === null && process.kill(pid, 'SIGKILL'), 5000)
  await exited
  clearTimeout(timer)
}

/** Starts `docker-registry serve` with a config of its own; resolves once `GET /v2/` answers 200 or 401. */
export async function startRegistry(opts: TestRegistryOptions = {}): Promise<TestRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'blobcache-registry-'))
  const users = opts.users ?? { alice: 'wonderland' }
  let tokenServer: TokenServer | undefined
  let served: Served | undefined
  try {
    let auth = ''
    if (opts.auth === 'htpasswd') {
      const lines: string[] = []
      for (const [user, password] of Object.entries(users)) {
        const { stdout } = await exec('htpasswd', ['-Bbn', user, password])
        lines.push(stdout.trim())
      }
      await writeFile(join(dir, 'htpasswd'), lines.join('\n') + '\n')
      auth = `auth:\n  htpasswd:\n    realm: test-registry\n    path: ${join(dir, 'htpasswd')}\n`
    } else if (opts.auth === 'token') {
      tokenServer = await startTokenServer({ ...opts.token, dir, users })
      auth =
        `auth:\n  token:\n    realm: ${tokenServer.realm}\n    service: ${tokenServer.service}\n` +
        `    issuer: ${tokenServer.issuer}\n    rootcertbundle: ${tokenServer.certPath}\n`
    }
    let tls = ''
    let certPath: string | undefined
    let client: { cert: string; key: string } | undefined
    if (opts.tls) {
      certPath = join(dir, 'tls.crt')
      await exec('openssl', [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'tls.key'),
        '-out', certPath, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:registry.test',
      ])
      tls = `  tls:\n    certificate: ${certPath}\n    key: ${join(dir, 'tls.key')}\n`
      if (opts.clientCerts) {
        const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
        await exec('openssl', ['req', '-x509', ...ec, '-keyout', join(dir, 'client-ca.key'), '-out', join(dir, 'client-ca.crt'), '-days', '2', '-subj', '/CN=blobcache test client CA'])
        await exec('openssl', ['req', ...ec, '-keyout', join(dir, 'client.key'), '-out', join(dir, 'client.csr'), '-subj', '/CN=blobcache test client'])
        await exec('openssl', [
          'x509', '-req', '-in', join(dir, 'client.csr'), '-CA', join(dir, 'client-ca.crt'), '-CAkey', join(dir, 'client-ca.key'),
          '-CAcreateserial', '-out', join(dir, 'client.cert'), '-days', '2',
        ])
        client = { cert: await readFile(join(dir, 'client.cert'), 'utf8'), key: await readFile(join(dir, 'client.key'), 'utf8') }
        tls += `    clientcas:\n      - ${join(dir, 'client-ca.crt')}\n`
      }
    }
    const configPath = join(dir, 'config.yml')
    for (let attempt = 0; ; attempt++) {
      const port = await freePort()
      const config =
        `version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n` +
        `storage:\n  filesystem:\n    rootdirectory: ${join(dir, 'storage')}\n  delete:\n    enabled: true\n` +
        `http:\n  addr: 127.0.0.1:${port}\n  secret: blobcache-test-secret\n` +
        tls +
        auth
      await writeFile(configPath, config)
      const url = `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}/v2/`
      try {
        served = await serve(configPath, url, client)
      } catch (err) {
        // the port may have been taken between freePort() and the registry's bind: try another
        const stderr = (err as { stderr?: string }).stderr ?? ''
        if (attempt >= 2 || !/address already in use/.test(stderr)) throw err
        continue
      }
      let current: Served | undefined = served
      const registry: TestRegistry = {
        host: `127.0.0.1:${port}`,
        port,
        dir,
        users,
        tokenServer,
        certPath,
        clientCert: client?.cert,
        clientKey: client?.key,
        configPath,
        get pid() {
          return current?.proc.pid ?? 0
        },
        get running() {
          return current !== undefined && current.proc.exitCode === null && current.proc.signalCode === null
        },
        halt: async () => {
          if (current) await halt(current)
        },
        restart: async () => {
          if (current) await halt(current)
          current = undefined
          // the old socket may linger a moment after the process is gone: retry the bind briefly
          for (let tries = 0; ; tries++) {
            try {
              current = await serve(configPath, url, client)
              return
            } catch (err) {
              const stderr = (err as { stderr?: string }).stderr ?? ''
              if (tries >= 20 || !/address already in use/.test(stderr)) throw err
              await sleep(100)
            }
          }
        },
        garbageCollect: async (gc = {}) => {
          if (registry.running) throw new Error('garbage-collect needs the registry halted first')
          const args = ['garbage-collect', ...(gc.deleteUntagged ? ['--delete-untagged'] : []), ...(gc.dryRun ? ['--dry-run'] : []), configPath]
          const { stdout, stderr } = await exec('docker-registry', args, { maxBuffer: 16 << 20 })
          return stdout + stderr
        },
        stop: async () => {
          if (current) await halt(current)
          await tokenServer?.close()
          await rm(dir, { recursive: true, force: true })
        },
      }
      return registry
    }
  } catch (err) {
    if (served && served.proc.exitCode === null) served.proc.kill('SIGKILL')
    await tokenServer?.close()
    await rm(dir, { recursive: true, force: true })
    throw err
  }
}

/**
 * A `docker://host/name` reference whose sources and destinations open with `registry` options
 * unless the caller passes a context (default: plain HTTP allowed, as the test registries need).
 */
export function registryRef(host: string, name: string, registry: RegistryOptions = { tlsVerify: false }): ImageReference {
  const ref = docker.parseReference(`//${host}/${name}`)
  const withOptions = (c?: SystemContext): SystemContext => ({ ...c, registry: c?.registry ?? registry })
  return {
    transport: ref.transport,
    stringWithinTransport: () => ref.stringWithinTransport(),
    dockerReference: () => ref.dockerReference(),
    newImageSource: (c) => ref.newImageSource(withOptions(c)),
    newImageDestination: (c) => ref.newImageDestination(withOptions(c)),
    deleteImage: (c) => ref.deleteImage(withOptions(c)),
  }
}
