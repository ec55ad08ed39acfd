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
//   node bench/image-cache.mjs [--runs N] [--cache DIR] [--cli bin/blobcache] [--lib dist/index.js]
//
// For information it also times ImageCache.imagePull inside a running process (what a program
// using the library pays per pull, without starting Node), against the same skopeo runs.
//
// The image is bench/make-image.mjs's 4 x 64 MiB one (shared with bench/run.mjs and
// bench/docker.mjs through the same cache directory). Commands alternate run by run after one
// untimed warm-up each; medians and the ratio (ours / skopeo, target <= 1.0) are printed and
// written to bench/image-cache-results.json.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import {
  ROOT, baseImage, benchArgs, cliRun, benchRegistry, benchWorkDir, builtCli, cliOption, exec, log, machineInfo, requireTools,
  skopeoPolicy, startThrottleProxy, timeAlternating, versus, writeResults,
} from './util.mjs'

const TARGET = 1.0

const { opts, runs } = benchArgs('usage: node bench/image-cache.mjs [--runs N] [--cache DIR] [--cli PATH] [--lib PATH]', {
  cli: cliOption,
  lib: { type: 'string', default: join(ROOT, 'dist', 'index.js') },
})
const CLI = builtCli(opts.cli)
const LIB = resolve(opts.lib)
const hasLib = existsSync(LIB) && readFileSync(LIB, 'utf8').includes('ImageCache')
requireTools('docker-registry', 'skopeo')

let registry
const work = benchWorkDir('blobcache-bench-image-cache-', () => registry?.killNow())
const policy = skopeoPolicy(work)

// ---- image, registry, proxy ------------------------------------------------------------------
const { base } = await baseImage(resolve(opts.cache))
registry = await benchRegistry(work)
await registry.start()
const { host } = registry
const image = `${host}/bench/app:latest`
const seeded = await exec('skopeo', ['--policy', policy, 'copy', '-q', '--dest-tls-verify=false', `oci:${base}:latest`, `docker://${image}`])
if (seeded.code !== 0) throw new Error(`seeding the registry failed: ${seeded.stderr}`)
// forwards every request unthrottled; counts manifest and blob requests
const proxy = await startThrottleProxy(host, Infinity)

// ---- timed case ------------------------------------------------------------------------------
const pulled = join(work, 'image-cache')
const copied = join(work, 'skopeo-oci')
const ours = cliRun(CLI, ['image-cache', '--cache', pulled, 'pull', '--tls-verify=false', '--platform', 'linux/amd64', image])
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
  machine: machineInfo(),
  skopeo: execFileSync('skopeo', ['--version'], { encoding: 'utf8' }).trim(),
  registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
  runs,
  cases: [],
  requests: {},
}
let failed = false
const commands = hasLib ? { ours, skopeo: theirs, library } : { ours, skopeo: theirs }
log(`pull: ${Object.keys(commands).join(' / ')}, ${runs} runs each (+1 warm-up)`)
const { times, failed: broken } = await timeAlternating({
  cmds: commands,
  runs,
  prepare: async () => {
    await rm(pulled, { recursive: true, force: true })
    await rm(copied, { recursive: true, force: true })
  },
  selfTimed: true,
})
const pull = versus('image-cache pull (empty cache) vs skopeo copy docker:// -> oci:', times.ours, times.skopeo, TARGET)
if (broken || !pull.pass) failed = true
results.cases.push(pull)
if (times.library) {
  results.cases.push(versus('ImageCache.imagePull in a running process vs skopeo copy (information)', times.library, times.skopeo, null))
}

// ---- request counts of cached pulls ----------------------------------------------------------
const viaProxy = `${proxy.host}/bench/app:latest`
const counted = join(work, 'counted')
const pullVia = (...extra) => exec(...cliRun(CLI, ['image-cache', '--cache', counted, 'pull', '--tls-verify=false', '--platform', 'linux/amd64', ...extra, viaProxy]))
for (const [label, extra] of [['first', []], ['again', []], ['always', ['--always-pull']]]) {
  proxy.reset()
  const r = await pullVia(...extra)
  if (r.code !== 0) throw new Error(`pull (${label}) failed: ${r.stderr}`)
  const manifests = proxy.requests.filter((q) => q.path.includes('/manifests/')).length
  const blobs = proxy.requests.filter((q) => q.path.includes('/blobs/')).length
  results.requests[label] = { manifests, blobs, total: manifests + blobs }
}
const { again, always } = results.requests
const againOk = again.total === 0
const alwaysOk = always.manifests === 1 && always.blobs === 0
if (!againOk || !alwaysOk) failed = true
await proxy.close()
await registry.stop()

printTable(results)
writeResults('image-cache-results.json', results)
process.exitCode = failed ? 1 : 0

// ---- helpers ---------------------------------------------------------------------------------

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
