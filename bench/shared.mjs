#!/usr/bin/env node
// Benchmarks the shared cache tier (issue 7, item 7): a second "machine" copying the 4 x 64 MiB
// gzip image from an origin registry reached through a proxy throttled to about 50 MB/s (a
// remote registry), with and without a shared tier on an unthrottled local registry:
//
//   fresh    empty --blob-cache dir, no tier:            docker://proxy/app -> oci:out
//   tier     empty --blob-cache dir, --shared-cache tier: docker://proxy/app -> oci:out
//
// A first machine copies the image once with --blob-cache and --shared-cache (filling the tier).
// Then the two cases alternate run by run (after one untimed warm-up each); medians and the
// ratio tier / fresh (target <= 0.4) are printed and written to bench/shared-results.json.
// Every output is checked (manifest digest), and the bytes each case pulled through the throttled
// proxy are recorded.
//
//   node bench/shared.mjs [--runs N] [--rate MB/s] [--cache DIR] [--cli dist/cli.js]
//
// Both registries are Debian's docker-registry on 127.0.0.1, started and stopped by pid.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { mkdir, rm } from 'node:fs/promises'
import { cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { ensureOciImage } from './make-image.mjs'
import { benchRegistry, log, median, round3, startThrottleProxy, usage, which } from './util.mjs'

const MiB = 1 << 20
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const TARGET = 0.4

const { values: opts } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    rate: { type: 'string', default: '50' },
    cache: { type: 'string', default: join(tmpdir(), 'blobcache-bench-v1') },
    cli: { type: 'string', default: join(ROOT, 'dist', 'cli.js') },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (opts.help) {
  console.log('usage: node bench/shared.mjs [--runs N] [--rate MB/s] [--cache DIR] [--cli PATH]')
  process.exit(0)
}
const runs = Number(opts.runs)
if (!Number.isInteger(runs) || runs < 1) usage(`--runs must be a positive integer, not ${opts.runs}`)
const rate = Number(opts.rate)
if (!(rate > 0)) usage(`--rate must be a positive number of MB/s, not ${opts.rate}`)
const CLI = resolve(opts.cli)
if (!existsSync(CLI)) usage(`${CLI} is missing: run \`npm run build\` first`)
if (!which('docker-registry')) usage('docker-registry is not on PATH')

const work = mkdtempSync(join(tmpdir(), 'blobcache-bench-shared-'))
let origin
let tier
let proxy
let running
process.on('exit', () => {
  // the last resort on any way out: every process this script started, by its pid
  if (running?.exitCode === null) running.kill('SIGKILL')
  origin?.killNow()
  tier?.killNow()
  execFileSync('rm', ['-rf', work])
})
process.on('SIGINT', () => process.exit(130))

let failed = false
try {
  await main()
} catch (err) {
  failed = true
  console.error(`bench: ${err?.stack ?? err}`)
} finally {
  await proxy?.close()
  await origin?.stop()
  await tier?.stop()
}
process.exitCode = failed ? 1 : 0

async function main() {
  // ---- image, registries, proxy ----------------------------------------------------------------
  const cacheDir = resolve(opts.cache)
  await mkdir(cacheDir, { recursive: true })
  const base = join(cacheDir, 'oci-4x64')
  log(`preparing the image in ${cacheDir} (first run only: a few minutes)`)
  const meta = await ensureOciImage(base, { layers: 4, layerBytes: 64 * MiB, randomShare: 0.5, level: 6 })
  log(`image: 4 layers x 64 MiB content, gzip: ${(meta.blobBytes / MiB).toFixed(1)} MiB of blobs`)

  await Promise.all([mkdir(join(work, 'origin')), mkdir(join(work, 'tier'))])
  origin = await benchRegistry(join(work, 'origin'))
  tier = await benchRegistry(join(work, 'tier'))
  await Promise.all([origin.start(true), tier.start(true)])
  proxy = await startThrottleProxy(origin.host, rate * 1e6)
  log(`origin ${origin.host} behind a ${rate} MB/s proxy at ${proxy.host}; tier ${tier.host}`)

  const remote = `docker://${proxy.host}/bench/app:latest`
  const tierName = `docker://${tier.host}/bench/cache`
  const pushed = await exec([CLI, 'copy', '-q', '--dest-tls-verify=false', `oci:${base}:latest`, `docker://${origin.host}/bench/app:latest`])
  if (pushed.code !== 0) throw new Error(`pushing the image to the origin failed: ${pushed.stderr}`)

  // ---- the first machine fills the tier --------------------------------------------------------
  const copyArgs = (cache, out, shared) => [
    CLI, 'copy', '-q', '--src-tls-verify=false', '--blob-cache', cache,
    ...(shared ? ['--shared-cache', tierName, '--shared-tls-verify=false'] : []),
    remote, `oci:${out}:latest`,
  ]
  proxy.reset()
  const first = await timed(copyArgs(join(work, 'machine1-cache'), join(work, 'machine1-out'), true))
  if (first.code !== 0) throw new Error(`the first machine failed: ${first.stderr}`)
  checkOutput(join(work, 'machine1-out'), meta.manifestDigest)
  log(`first machine (origin through the proxy, filling the tier): ${first.seconds.toFixed(2)} s, ${(proxy.bytes / MiB).toFixed(1)} MiB through the proxy`)

  // ---- alternated runs --------------------------------------------------------------------------
  const cases = { fresh: false, tier: true }
  const times = { fresh: [], tier: [] }
  const proxied = { fresh: [], tier: [] }
  log(`fresh / tier, ${runs} runs each (+1 warm-up)`)
  for (let round = 0; round <= runs; round++) {
    for (const [name, shared] of Object.entries(cases)) {
      const cache = join(work, `${name}-cache`)
      const out = join(work, `${name}-out`)
      await rm(cache, { recursive: true, force: true })
      await rm(out, { recursive: true, force: true })
      proxy.reset()
      const r = await timed(copyArgs(cache, out, shared))
      if (r.code !== 0) throw new Error(`${name} failed (exit ${r.code}): ${r.stderr.trim().split('\n').slice(-5).join('\n')}`)
      checkOutput(out, meta.manifestDigest)
      if (shared && r.stderr.includes('warning')) throw new Error(`${name}: the tier warned: ${r.stderr}`)
      if (round > 0) {
        times[name].push(r.seconds)
        proxied[name].push(proxy.bytes)
      }
      log(`  ${round === 0 ? 'warm-up' : `run ${round}`} ${name}: ${r.seconds.toFixed(2)} s, ${(proxy.bytes / MiB).toFixed(1)} MiB through the proxy`)
    }
  }

  const medFresh = median(times.fresh)
  const medTier = median(times.tier)
  const ratio = medTier / medFresh
  const pass = ratio <= TARGET
  if (!pass) failed = true
  console.log(
    `\ncase                                       median (s)  MiB via proxy\n` +
      `fresh cache, origin via ${String(rate).padEnd(3)} MB/s proxy       ${medFresh.toFixed(3).padStart(10)}  ${(median(proxied.fresh) / MiB).toFixed(1).padStart(13)}\n` +
      `fresh cache + shared tier (local registry) ${medTier.toFixed(3).padStart(10)}  ${(median(proxied.tier) / MiB).toFixed(1).padStart(13)}\n` +
      `\nratio tier / fresh: ${ratio.toFixed(3)} (target <= ${TARGET}) ${pass ? 'ok' : 'MISS'}`,
  )
  const results = {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), node: process.version, loadavg: loadavg() },
    registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
    image: { layers: 4, layerBytes: 64 * MiB, blobBytes: meta.blobBytes, manifestDigest: meta.manifestDigest },
    proxyRateMBps: rate,
    runs,
    firstMachineSeconds: round3(first.seconds),
    runsFresh: times.fresh.map(round3),
    runsTier: times.tier.map(round3),
    proxiedBytesFresh: proxied.fresh,
    proxiedBytesTier: proxied.tier,
    medianFresh: round3(medFresh),
    medianTier: round3(medTier),
    ratio: round3(ratio),
    target: TARGET,
    pass,
  }
  const file = join(ROOT, 'bench', 'shared-results.json')
  writeFileSync(file, JSON.stringify(results, null, 2) + '\n')
  console.log(`\nwrote ${file}`)
}

/** The copied layout holds the expected manifest. */
function checkOutput(layout, manifestDigest) {
  const index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8'))
  const got = index.manifests?.[0]?.digest
  if (got !== manifestDigest) throw new Error(`${layout}: manifest ${got}, expected ${manifestDigest}`)
}

/** Runs `node ...args`, timing it; resolves its exit code, stderr tail and wall seconds. */
function timed(args) {
  const t0 = performance.now()
  return exec(args).then((r) => ({ ...r, seconds: (performance.now() - t0) / 1000 }))
}

function exec(args) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] })
    running = child
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (s) => (stderr = (stderr + s).slice(-20_000)))
    child.on('error', reject)
    child.on('close', (code, signal) => {
      running = undefined
      resolvePromise({ code: code ?? (signal ? 128 : 1), stderr })
    })
  })
}
