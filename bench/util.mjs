// Small helpers shared by the benchmark scripts.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { Agent, createServer as createHttpServer, request } from 'node:http'
import { createServer } from 'node:net'
import { cpus, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { Transform, pipeline } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { ensureOciImage } from './make-image.mjs'

const MiB = 1 << 20

/** The repository's root directory (the parent of bench/). */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')

/**
 * The `--cli PATH` option of the scripts that take one: the built command, bin/blobcache by
 * default (what users run: it starts from the startup snapshot `npm run build` makes); a `.js`
 * file (dist/cli.js) is run with node.
 */
export const cliOption = { type: 'string', default: join(ROOT, 'bin', 'blobcache') }

/** `[command, args]` that run the CLI at `cli` (see {@link cliOption}) with `args`. */
export function cliRun(cli, args) {
  return /\.[cm]?js$/.test(cli) ? [process.execPath, [cli, ...args]] : [cli, args]
}

/**
 * Parses the command line: the options every script has (`--runs N`, default 5; `--cache DIR`,
 * default $TMPDIR/blobcache-bench-v1, where generated images are kept; `--help`/`-h`) and the
 * script's own `options` (node:util parseArgs options). `--help` prints `help` and exits 0; a
 * `--runs` that is not a positive integer exits 2 with a usage line. Returns `{ opts, runs }`.
 */
export function benchArgs(help, options = {}) {
  const { values: opts } = parseArgs({
    options: {
      runs: { type: 'string', default: '5' },
      cache: { type: 'string', default: join(tmpdir(), 'blobcache-bench-v1') },
      ...options,
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  if (opts.help) {
    console.log(help)
    process.exit(0)
  }
  const runs = Number(opts.runs)
  if (!Number.isInteger(runs) || runs < 1) usage(`--runs must be a positive integer, not ${opts.runs}`)
  return { opts, runs }
}

/** The absolute path of the built CLI at `path`; exits 2 with a usage line (ending in `hint`) when it is missing. */
export function builtCli(path, hint = 'run `npm run build` first') {
  const file = resolve(path)
  if (!existsSync(file)) usage(`${file} is missing: ${hint}`)
  return file
}

/** Exits 2 with a usage line unless every tool in `names` is on PATH. */
export function requireTools(...names) {
  for (const name of names) if (!which(name)) usage(`${name} is not on PATH`)
}

/**
 * A fresh directory `$TMPDIR/<prefix>…`, removed when the process exits, after `onExit()` (the
 * place to stop, by pid, what the script started). SIGINT exits with 130, through that handler.
 */
export function benchWorkDir(prefix, onExit) {
  const work = mkdtempSync(join(tmpdir(), prefix))
  process.on('exit', () => {
    onExit?.()
    execFileSync('rm', ['-rf', work])
  })
  process.on('SIGINT', () => process.exit(130))
  return work
}

/** Writes a skopeo policy that accepts anything into `work`; returns its path. */
export function skopeoPolicy(work) {
  const policy = join(work, 'policy.json')
  writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }))
  return policy
}

/** The machine fields of a results file: CPU count and model, memory in GiB, Node.js version. */
export function machineInfo() {
  return { cpus: cpus().length, cpu: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), node: process.version }
}

/** The make-image.mjs options of the 4 x 64 MiB gzip image every script copies. */
export const BASE_IMAGE = { layers: 4, layerBytes: 64 * MiB, randomShare: 0.5, level: 6 }

/**
 * The 4 x 64 MiB image as an OCI layout `oci-4x64` under `cacheDir` (created on first use, which
 * takes minutes), with progress lines. Resolves `{ base, meta }`: the layout's path and
 * ensureOciImage's description of it.
 */
export async function baseImage(cacheDir) {
  await mkdir(cacheDir, { recursive: true })
  const base = join(cacheDir, 'oci-4x64')
  log(`preparing the image in ${cacheDir} (first run only: a few minutes)`)
  const meta = await ensureOciImage(base, BASE_IMAGE)
  log(`image: 4 layers x 64 MiB content, gzip: ${(meta.blobBytes / MiB).toFixed(1)} MiB of blobs`)
  return { base, meta }
}

/**
 * Spawns `cmd` with `args` (no shell; stdin and stdout ignored) and resolves `{ code, stderr }`:
 * its exit code (128 when a signal ended it) and the last 20 000 characters of its stderr; rejects
 * when it cannot be spawned. `watch(child)` is called once it is spawned, and a function it
 * returns when the child is gone.
 */
export function exec(cmd, args, { watch } = {}) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] })
    const gone = watch?.(child)
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (s) => {
      stderr = (stderr + s).slice(-20_000)
    })
    child.on('error', (err) => {
      gone?.()
      reject(err)
    })
    child.on('close', (code, signal) => {
      gone?.()
      resolvePromise({ code: code ?? (signal ? 128 : 1), stderr })
    })
  })
}

/**
 * Times commands side by side. `cmds` maps a key to `[cmd, args]`; every round runs each command
 * once, in that order, and there are `runs` timed rounds, after one untimed warm-up round unless
 * `warmup` is false. `prepare()` is awaited before every run, outside the timing. A run is timed
 * by the wall clock around `exec(cmd, args)` (default: {@link exec}); with `selfTimed`, a
 * `seconds=<n>` a command writes to stderr is taken instead. A numeric `cpu` in exec's result
 * (CPU seconds) is collected alongside. A command that exits non-zero is reported on stderr with
 * the last 5 lines of its stderr and not run again. Unless `settle` is false (or BENCH_NO_SYNC is
 * set), `sync` runs after `prepare()`, outside the timing, so that no run starts while the disk
 * still holds the writes and deletions of the one before.
 *
 * Resolves `{ times, cpu, failed }`: per key, the seconds of the timed runs (null for a command
 * that failed) and the CPU seconds likewise; `failed` is true when any command failed.
 */
export async function timeAlternating({ cmds, runs, prepare = async () => {}, warmup = true, exec: execute = exec, selfTimed = false, settle = !process.env.BENCH_NO_SYNC }) {
  const keys = Object.keys(cmds)
  const times = Object.fromEntries(keys.map((k) => [k, []]))
  const cpu = Object.fromEntries(keys.map((k) => [k, []]))
  let failed = false
  for (let round = warmup ? -1 : 0; round < runs; round++) {
    for (const [key, [cmd, args]] of Object.entries(cmds)) {
      if (times[key] === null) continue
      await prepare()
      // the previous command's writes and prepare()'s deletions go to disk now, outside the
      // timing: otherwise the next command's first fsync waits for them (ext4 commits them
      // with it), and each command pays for the one before it
      if (settle) await exec('sync', [])
      const t0 = performance.now()
      const r = await execute(cmd, args)
      const wall = (performance.now() - t0) / 1000
      if (r.code !== 0) {
        failed = true
        times[key] = cpu[key] = null
        console.error(`  ${key} failed (exit ${r.code}): ${cmd} ${args.join(' ')}\n    ${r.stderr.trim().split('\n').slice(-5).join('\n    ')}`)
        continue
      }
      if (round < 0) continue
      const reported = selfTimed ? /seconds=([0-9.]+)/.exec(r.stderr) : null
      times[key].push(reported ? Number(reported[1]) : wall)
      if (typeof r.cpu === 'number') cpu[key].push(r.cpu)
    }
  }
  return { times, cpu, failed }
}

/**
 * One row of an ours-against-skopeo comparison: the runs, their medians (null when a side
 * failed), the ratio ours / skopeo and whether it is within `target` (`target` null: for
 * information, `pass` null).
 */
export function versus(label, runsOurs, runsSkopeo, target) {
  const ma = runsOurs ? median(runsOurs) : null
  const mb = runsSkopeo ? median(runsSkopeo) : null
  const ratio = ma !== null && mb !== null ? ma / mb : null
  const pass = target === null ? null : ratio !== null && ratio <= target
  return { label, runsOurs, runsSkopeo, medianOurs: round3(ma), medianSkopeo: round3(mb), ratio: round3(ratio), target, pass }
}

/** Writes `results` as JSON to bench/`name` and says so on stdout. */
export function writeResults(name, results) {
  const file = join(ROOT, 'bench', name)
  writeFileSync(file, JSON.stringify(results, null, 2) + '\n')
  console.log(`\nwrote ${file}`)
}

/** Prints a table under a blank line: a header, a rule, then `rows`; the first column left-aligned, the others right-aligned. */
export function printColumns(head, rows) {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((l) => l[i].length)))
  const fmt = (cells) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd()
  console.log(`\n${fmt(head)}\n${widths.map((w) => '-'.repeat(w)).join('  ')}`)
  for (const l of rows) console.log(fmt(l))
}

export function freePort() {
  return new Promise((resolvePromise, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port: p } = server.address()
      server.close(() => resolvePromise(p))
    })
  })
}

export function which(name) {
  for (const d of (process.env.PATH ?? '').split(':')) if (d && existsSync(join(d, name))) return join(d, name)
  return undefined
}

export function median(xs) {
  const s = [...xs].sort((x, y) => x - y)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

export function round3(x) {
  return x === null || x === undefined ? null : Math.round(x * 1000) / 1000
}

export function log(msg) {
  console.log(`bench: ${msg}`)
}

export function usage(msg) {
  console.error(`bench: ${msg}`)
  process.exit(2)
}

/** The HTTP status of a GET, 0 when the connection fails. */
export function status(url) {
  return new Promise((resolvePromise) => {
    const req = request(url, (res) => {
      res.resume()
      resolvePromise(res.statusCode)
    })
    req.on('error', () => resolvePromise(0))
    req.end()
  })
}

/**
 * Debian's docker-registry on 127.0.0.1 on a free port, storage under `work`. `start(wipe)`
 * (re)starts it, with empty storage when `wipe`, and waits for GET /v2/; `stop()` stops it by its
 * pid; `killNow()` is for exit handlers.
 */
export async function benchRegistry(work) {
  const host = `127.0.0.1:${await freePort()}`
  const storage = join(work, 'storage')
  const config = join(work, 'config.yml')
  await writeFile(
    config,
    `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${storage}\n` +
      `  delete:\n    enabled: true\nhttp:\n  addr: ${host}\n  secret: blobcache-bench\n`,
  )
  let child
  const stop = async () => {
    if (!child || child.exitCode !== null) return
    const exited = new Promise((r) => child.once('exit', r))
    child.kill('SIGTERM')
    await exited
  }
  return {
    host,
    stop,
    killNow() {
      if (child?.exitCode === null) child.kill('SIGKILL')
    },
    async start(wipe = false) {
      await stop()
      if (wipe) await rm(storage, { recursive: true, force: true })
      child = spawn('docker-registry', ['serve', config], { stdio: 'ignore' })
      for (let i = 0; i < 400; i++) {
        if ((await status(`http://${host}/v2/`)) === 200) return
        await sleep(25)
      }
      throw new Error('docker-registry did not start')
    },
  }
}

/**
 * A token bucket of `bytesPerSecond` (burst `burst` bytes) shared by every stream that takes from
 * it: `take(n)` resolves once `n` bytes may pass. Takers are served in arrival order, so the total
 * rate holds across connections and each gets its turn.
 */
export function tokenBucket(bytesPerSecond, burst = 256 << 10) {
  let tokens = burst
  let last = performance.now()
  let chain = Promise.resolve()
  const refill = () => {
    const now = performance.now()
    tokens = Math.min(burst, tokens + ((now - last) / 1000) * bytesPerSecond)
    last = now
  }
  return {
    take(n) {
      chain = chain.then(async () => {
        refill()
        if (tokens < n) {
          await sleep(Math.ceil(((n - tokens) / bytesPerSecond) * 1000))
          refill()
        }
        tokens -= n
      })
      return chain
    },
  }
}

/**
 * An HTTP proxy on 127.0.0.1 in front of `target` (`host:port`) whose response bodies together
 * pass at no more than `bytesPerSecond` (one token bucket for all connections): a slow link to a
 * remote registry. The Host header is passed through, so the registry's Locations point back at
 * the proxy. `bytes` counts the response body bytes sent, `requests` the requests seen (method
 * and path), for checking what went over the slow link. `close()` ends every connection. With
 * `bytesPerSecond` Infinity nothing is held back: a proxy that only counts.
 */
export async function startThrottleProxy(target, bytesPerSecond) {
  const i = target.lastIndexOf(':')
  const [host, port] = [target.slice(0, i), Number(target.slice(i + 1))]
  const upstream = new Agent({ keepAlive: true })
  const bucket = Number.isFinite(bytesPerSecond) ? tokenBucket(bytesPerSecond) : undefined
  const sockets = new Set()
  const state = { bytes: 0, requests: [] }
  const PIECE = 64 << 10
  const throttle = () =>
    new Transform({
      highWaterMark: 1 << 20,
      transform(chunk, _enc, cb) {
        ;(async () => {
          for (let off = 0; off < chunk.length; off += PIECE) {
            const piece = chunk.subarray(off, off + PIECE)
            if (bucket) await bucket.take(piece.length)
            state.bytes += piece.length
            this.push(piece)
          }
        })().then(() => cb(), cb)
      },
    })
  const server = createHttpServer((req, res) => {
    state.requests.push({ method: req.method, path: req.url })
    const out = request({ host, port, method: req.method, path: req.url, headers: req.headers, agent: upstream }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      pipeline(up, throttle(), res, () => {})
    })
    out.on('error', () => res.socket?.destroy())
    req.pipe(out)
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return {
    host: `127.0.0.1:${server.address().port}`,
    get bytes() {
      return state.bytes
    },
    requests: state.requests,
    reset() {
      state.bytes = 0
      state.requests.length = 0
    },
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy()
        upstream.destroy()
        server.close(() => r())
      }),
  }
}
