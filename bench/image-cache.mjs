#!/usr/bin/env node
// Benchmarks `blobcache image-cache pull` against `skopeo copy docker://… oci:…`, side by side in
// one run, from a real registry (Debian's docker-registry) on 127.0.0.1:
//
//   pull     image-cache pull into an empty cache  vs  skopeo copy into a fresh oci: layout
//
// then checks, through a request-counting proxy, what a pull of a cached image costs:
//   again    a second pull makes no request at all (so no blob request)
//   always   with --always-pull: one manifest request, no blob request
//
//   node bench/image-cache.mjs [--runs N] [--cache DIR] [--cli dist/cli.js] [--lib dist/index.js]
//
// For information it also times ImageCache.imagePull inside a running process (what a program
// using the library pays per pull, without starting Node), against the same skopeo runs.
//
// The image is bench/make-image.mjs's 4 x 64 MiB one (shared with bench/run.mjs and
// bench/docker.mjs through the same cache directory). Commands alternate run by run after one
// untimed warm-up each; medians and the ratio (ours / skopeo, target <= 1.0) are printed and
// written to bench/image-cache-results.json.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { createServer as createHttpServer, request } from 'node:http'
import { createServer } from 'node:net'
import { cpus, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { ensureOciImage } from './make-image.mjs'
import { benchRegistry, which, median, round3, log, usage } from './util.mjs'

const MiB = 1 << 20
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const TARGET = 1.0

const { values: opts } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    cache: { type: 'string', default: join(tmpdir(), 'blobcache-bench-v1') },
    cli: { type: 'string', default: join(ROOT, 'dist', 'cli.js') },
    lib: { type: 'string', default: join(ROOT, 'dist', 'index.js') },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (opts.help) {
  console.log('usage: node bench/image-cache.mjs [--runs N] [--cache DIR] [--cli PATH] [--lib PATH]')
  process.exit(0)
}
const runs = Number(opts.runs)
if (!Number.isInteger(runs) || runs < 1) usage(`--runs must be a positive integer, not ${opts.runs}`)
const CLI = resolve(opts.cli)
if (!existsSync(CLI)) usage(`${CLI} is missing: run \`npm run build\` first`)
const LIB = resolve(opts.lib)
const hasLib = existsSync(LIB) && readFileSync(LIB, 'utf8').includes('ImageCache')
for (const tool of ['docker-registry', 'skopeo']) if (!which(tool)) usage(`${tool} is not on PATH`)

const work = mkdtempSync(join(tmpdir(), 'blobcache-bench-image-cache-'))
const policy = join(work, 'policy.json')
writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }))
let registry
let proxy
process.on('exit', () => {
  registry?.killNow()
  execFileSync('rm', ['-rf', work])
})
process.on('SIGINT', () => process.exit(130))

// ---- image, registry, proxy ------------------------------------------------------------------
const cacheDir = resolve(opts.cache)
await mkdir(cacheDir, { recursive: true })
const base = join(cacheDir, 'oci-4x64')
log(`preparing the image in ${cacheDir} (first run only: a few minutes)`)
const meta = await ensureOciImage(base, { layers: 4, layerBytes: 64 * MiB, randomShare: 0.5, level: 6 })
log(`image: 4 layers x 64 MiB content, gzip: ${(meta.blobBytes / MiB).toFixed(1)} MiB of blobs`)

registry = await benchRegistry(work)
await registry.start()
const { host } = registry
const image = `${host}/bench/app:latest`
const seeded = await exec('skopeo', ['--policy', policy, 'copy', '-q', '--dest-tls-verify=false', `oci:${base}:latest`, `docker://${image}`])
if (seeded.code !== 0) throw new Error(`seeding the registry failed: ${seeded.stderr}`)
proxy = await startCountingProxy(host)

// ---- timed case ------------------------------------------------------------------------------
const pulled = join(work, 'image-cache')
const copied = join(work, 'skopeo-oci')
const ours = ['node', [CLI, 'image-cache', '--cache', pulled, 'pull', '--tls-verify=false', '--platform', 'linux/amd64', image]]
const theirs = ['skopeo', ['--policy', policy, 'copy', '-q', '--src-tls-verify=false', `docker://${image}`, `oci:${copied}:latest`]]
// the library inside a process: the script times only the pull and prints the seconds
const inProcess = join(work, 'in-process.mjs')
writeFileSync(inProcess, `
import { ImageCache } from ${JSON.stringify(LIB)}
const cache = await ImageCache.open(process.argv[2], { registry: { tlsVerify: false } })
const t0 = performance.now()
await cache.imagePull(process.argv[3], { platforms: ['linux/amd64'] })
process.stderr.write('seconds=' + (performance.now() - t0) / 1000 + '\\n')
`)
const library = ['node', [inProcess, pulled, image]]
const results = {
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), node: process.version },
  skopeo: execFileSync('skopeo', ['--version'], { encoding: 'utf8' }).trim(),
  registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
  runs,
  cases: [],
  requests: {},
}
let failed = false
const commands = hasLib ? { ours, skopeo: theirs, library } : { ours, skopeo: theirs }
const times = await timeAlternating('pull', commands, async () => {
  await rm(pulled, { recursive: true, force: true })
  await rm(copied, { recursive: true, force: true })
})
const ma = times.ours ? median(times.ours) : null
const mb = times.skopeo ? median(times.skopeo) : null
const ratio = ma !== null && mb !== null ? ma / mb : null
if (ratio === null || ratio > TARGET) failed = true
results.cases.push({
  label: 'image-cache pull (empty cache) vs skopeo copy docker:// -> oci:',
  runsOurs: times.ours, runsSkopeo: times.skopeo, medianOurs: round3(ma), medianSkopeo: round3(mb),
  ratio: round3(ratio), target: TARGET, pass: ratio !== null && ratio <= TARGET,
})
if (times.library) {
  const ml = median(times.library)
  results.cases.push({
    label: 'ImageCache.imagePull in a running process vs skopeo copy (information)',
    runsOurs: times.library, runsSkopeo: times.skopeo, medianOurs: round3(ml), medianSkopeo: round3(mb),
    ratio: round3(mb ? ml / mb : null), target: null, pass: null,
  })
}

// ---- request counts of cached pulls ----------------------------------------------------------
const viaProxy = `${proxy.host}/bench/app:latest`
const counted = join(work, 'counted')
const pullVia = (...extra) => exec('node', [CLI, 'image-cache', '--cache', counted, 'pull', '--tls-verify=false', '--platform', 'linux/amd64', ...extra, viaProxy])
for (const [label, extra] of [['first', []], ['again', []], ['always', ['--always-pull']]]) {
  proxy.clear()
  const r = await pullVia(...extra)
  if (r.code !== 0) throw new Error(`pull (${label}) failed: ${r.stderr}`)
  results.requests[label] = proxy.counts()
}
const { again, always } = results.requests
const againOk = again.total === 0
const alwaysOk = always.manifests === 1 && always.blobs === 0
if (!againOk || !alwaysOk) failed = true
proxy.server.close()
await registry.stop()

printTable(results)
const out = join(ROOT, 'bench', 'image-cache-results.json')
writeFileSync(out, JSON.stringify(results, null, 2) + '\n')
console.log(`\nwrote ${out}`)
process.exitCode = failed ? 1 : 0

// ---- helpers ---------------------------------------------------------------------------------

/** Runs each command `runs` times, alternating them, after one untimed warm-up of each. */
async function timeAlternating(name, cmds, prepare) {
  const t = Object.fromEntries(Object.keys(cmds).map((k) => [k, []]))
  log(`${name}: ${Object.keys(cmds).join(' / ')}, ${runs} runs each (+1 warm-up)`)
  for (let round = 0; round <= runs; round++) {
    for (const [key, [cmd, args]] of Object.entries(cmds)) {
      if (t[key] === null) continue
      await prepare()
      const t0 = performance.now()
      const r = await exec(cmd, args)
      const inner = /seconds=([0-9.]+)/.exec(r.stderr)
      const seconds = inner ? Number(inner[1]) : (performance.now() - t0) / 1000
      if (r.code !== 0) {
        failed = true
        t[key] = null
        console.error(`  ${key} failed (exit ${r.code}): ${cmd} ${args.join(' ')}\n    ${r.stderr.trim().split('\n').slice(-5).join('\n    ')}`)
        continue
      }
      if (round > 0) t[key].push(seconds)
    }
  }
  return t
}

/** An HTTP proxy that forwards to `target` and counts manifest and blob requests. */
async function startCountingProxy(target) {
  const [targetHost, targetPort] = target.split(':')
  let seen = []
  const server = createHttpServer((req, res) => {
    seen.push({ method: req.method, path: req.url })
    const up = request({ host: targetHost, port: Number(targetPort), method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers)
      answer.pipe(res)
    })
    up.on('error', () => res.destroy())
    req.pipe(up)
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return {
    server,
    host: `127.0.0.1:${server.address().port}`,
    clear: () => (seen = []),
    counts: () => {
      const manifests = seen.filter((r) => r.path.includes('/manifests/')).length
      const blobs = seen.filter((r) => r.path.includes('/blobs/')).length
      return { manifests, blobs, total: manifests + blobs }
    },
  }
}

function printTable(res) {
  console.log(`\n${'case'.padEnd(72)}  ours (s)  skopeo (s)  ratio  target`)
  for (const c of res.cases) {
    const target = c.target === null ? '(info)' : `<= ${c.target.toFixed(1)} ${c.pass ? 'ok' : 'MISS'}`
    console.log(
      `${c.label.padEnd(72)}  ${(c.medianOurs?.toFixed(3) ?? 'error').padStart(8)}  ${(c.medianSkopeo?.toFixed(3) ?? 'error').padStart(10)}  ` +
        `${(c.ratio?.toFixed(3) ?? '-').padStart(5)}  ${target}`,
    )
  }
  const q = res.requests
  console.log(`\nrequests through the proxy (manifests / blobs):`)
  console.log(`  first pull, empty cache: ${q.first.manifests} / ${q.first.blobs}`)
  console.log(`  second pull:             ${q.again.manifests} / ${q.again.blobs}   ${q.again.total === 0 ? 'ok (no request)' : 'MISS'}`)
  console.log(`  --always-pull:           ${q.always.manifests} / ${q.always.blobs}   ${q.always.manifests === 1 && q.always.blobs === 0 ? 'ok (one manifest, no blob)' : 'MISS'}`)
}

function exec(cmd, args) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (s) => (stderr = (stderr + s).slice(-20_000)))
    child.on('error', reject)
    child.on('close', (code, signal) => resolvePromise({ code: code ?? (signal ? 128 : 1), stderr }))
  })
}







