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
//   node bench/shared.mjs [--runs N] [--rate MB/s] [--cache DIR] [--cli bin/blobcache]
//
// Both registries are Debian's docker-registry on 127.0.0.1, started and stopped by pid.
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdir, rm } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join, resolve } from 'node:path'
import {
  cliRun,
  BASE_IMAGE, baseImage, benchArgs, benchRegistry, benchWorkDir, builtCli, cliOption, exec, log, machineInfo, median,
  requireTools, round3, startThrottleProxy, usage, writeResults,
} from './util.mjs'

const MiB = 1 << 20
const TARGET = 0.4

const { opts, runs } = benchArgs('usage: node bench/shared.mjs [--runs N] [--rate MB/s] [--cache DIR] [--cli PATH]', {
  rate: { type: 'string', default: '50' },
  cli: cliOption,
})
const rate = Number(opts.rate)
if (!(rate > 0)) usage(`--rate must be a positive number of MB/s, not ${opts.rate}`)
const CLI = builtCli(opts.cli)
requireTools('docker-registry')

let origin
let tier
let proxy
let running
const work = benchWorkDir('blobcache-bench-shared-', () => {
  // the last resort on any way out: every process this script started, by its pid
  if (running?.exitCode === null) running.kill('SIGKILL')
  origin?.killNow()
  tier?.killNow()
})

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
  const { base, meta } = await baseImage(resolve(opts.cache))

  await Promise.all([mkdir(join(work, 'origin')), mkdir(join(work, 'tier'))])
  origin = await benchRegistry(join(work, 'origin'))
  tier = await benchRegistry(join(work, 'tier'))
  await Promise.all([origin.start(true), tier.start(true)])
  proxy = await startThrottleProxy(origin.host, rate * 1e6)
  log(`origin ${origin.host} behind a ${rate} MB/s proxy at ${proxy.host}; tier ${tier.host}`)

  const remote = `docker://${proxy.host}/bench/app:latest`
  const tierName = `docker://${tier.host}/bench/cache`
  const pushed = await timed(['copy', '-q', '--dest-tls-verify=false', `oci:${base}:latest`, `docker://${origin.host}/bench/app:latest`])
  if (pushed.code !== 0) throw new Error(`pushing the image to the origin failed: ${pushed.stderr}`)

  // ---- the first machine fills the tier --------------------------------------------------------
  const copyArgs = (cache, out, shared) => [
    'copy', '-q', '--src-tls-verify=false', '--blob-cache', cache,
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
    machine: { ...machineInfo(), loadavg: loadavg() },
    registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
    image: { layers: BASE_IMAGE.layers, layerBytes: BASE_IMAGE.layerBytes, blobBytes: meta.blobBytes, manifestDigest: meta.manifestDigest },
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
  writeResults('shared-results.json', results)
}

/** The copied layout holds the expected manifest. */
function checkOutput(layout, manifestDigest) {
  const index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8'))
  const got = index.manifests?.[0]?.digest
  if (got !== manifestDigest) throw new Error(`${layout}: manifest ${got}, expected ${manifestDigest}`)
}

/** Runs `node ...args` (exec, kept in `running` while it runs), timing it; resolves its exit code, stderr tail and wall seconds. */
async function timed(args) {
  const t0 = performance.now()
  const watch = (child) => {
    running = child
    return () => (running = undefined)
  }
  const r = await exec(...cliRun(CLI, args), { watch })
  return { ...r, seconds: (performance.now() - t0) / 1000 }
}
