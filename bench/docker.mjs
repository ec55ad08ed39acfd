#!/usr/bin/env node
// Benchmarks docker:// copies of the blobcache CLI against skopeo, side by side in one run, against
// a real registry (Debian's docker-registry) on 127.0.0.1:
//
//   push     oci: -> docker://   into an empty registry (fresh storage before every run)
//   pull     docker:// -> oci:   into a fresh layout
//   repush   oci: -> docker://   when the registry already holds every blob
//
//   node bench/docker.mjs [--runs N] [--only push,pull,repush] [--cache DIR] [--cli dist/cli.js]
//
// The image is bench/make-image.mjs's 4 x 64 MiB one (shared with bench/run.mjs through the same
// cache directory). Commands alternate run by run after one untimed warm-up each; medians and
// ratios (ours / skopeo) are printed and written to bench/docker-results.json. When
// /usr/bin/time is there, the user+sys CPU time of each command is recorded too (the registry's
// own CPU is not included): on a shared machine it is steadier than the wall time.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { createServer } from 'node:net'
import { cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { ensureOciImage } from './make-image.mjs'
import { benchRegistry, which, median, round3, log, usage } from './util.mjs'

const MiB = 1 << 20
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const CASES = { push: 0.8, pull: 0.8, repush: 2.0 }

const { values: opts } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    only: { type: 'string' },
    cache: { type: 'string', default: join(tmpdir(), 'blobcache-bench-v1') },
    cli: { type: 'string', default: join(ROOT, 'dist', 'cli.js') },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (opts.help) {
  console.log('usage: node bench/docker.mjs [--runs N] [--only push,pull,repush] [--cache DIR] [--cli PATH]')
  process.exit(0)
}
const runs = Number(opts.runs)
if (!Number.isInteger(runs) || runs < 1) usage(`--runs must be a positive integer, not ${opts.runs}`)
const only = opts.only ? opts.only.split(',').map((s) => s.trim()) : Object.keys(CASES)
for (const c of only) if (!(c in CASES)) usage(`unknown case ${c}; cases: ${Object.keys(CASES).join(' ')}`)
const CLI = resolve(opts.cli)
const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined
if (!existsSync(CLI)) usage(`${CLI} is missing: run \`npm run build\` first`)
for (const tool of ['docker-registry', 'skopeo']) if (!which(tool)) usage(`${tool} is not on PATH`)

const work = mkdtempSync(join(tmpdir(), 'blobcache-bench-docker-'))
const policy = join(work, 'policy.json')
writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }))
let registry
process.on('exit', () => {
  registry?.killNow()
  execFileSync('rm', ['-rf', work])
})
process.on('SIGINT', () => process.exit(130))

// ---- image and registry ----------------------------------------------------------------------
const cacheDir = resolve(opts.cache)
await mkdir(cacheDir, { recursive: true })
const base = join(cacheDir, 'oci-4x64')
log(`preparing the image in ${cacheDir} (first run only: a few minutes)`)
const meta = await ensureOciImage(base, { layers: 4, layerBytes: 64 * MiB, randomShare: 0.5, level: 6 })
log(`image: 4 layers x 64 MiB content, gzip: ${(meta.blobBytes / MiB).toFixed(1)} MiB of blobs`)

registry = await benchRegistry(work)
const { host } = registry
const startRegistry = (wipe) => registry.start(wipe)
const stopRegistry = () => registry.stop()

// ---- cases -----------------------------------------------------------------------------------
const src = `oci:${base}:latest`
const remote = `docker://${host}/bench/app:latest`
const dest = join(work, 'pulled')
const ours = (...args) => ['node', [CLI, 'copy', '-q', ...args]]
const theirs = (...args) => ['skopeo', ['--policy', policy, 'copy', '-q', ...args]]
const results = {
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), node: process.version, loadavgAtStart: loadavg() },
  skopeo: execFileSync('skopeo', ['--version'], { encoding: 'utf8' }).trim(),
  registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
  runs,
  cases: [],
}
const table = []
let failed = false

if (only.includes('push')) {
  const times = await timeAlternating(
    'push',
    { ours: ours('--dest-tls-verify=false', src, remote), skopeo: theirs('--dest-tls-verify=false', src, remote) },
    () => startRegistry(true),
  )
  table.push(compare('push oci -> docker (empty registry)', times, CASES.push))
}

if (only.includes('pull') || only.includes('repush')) {
  await startRegistry(true)
  const seeded = await exec(...theirs('--dest-tls-verify=false', src, remote))
  if (seeded.code !== 0) throw new Error(`seeding the registry failed: ${seeded.stderr}`)
}
if (only.includes('pull')) {
  const times = await timeAlternating(
    'pull',
    { ours: ours('--src-tls-verify=false', remote, `oci:${dest}:latest`), skopeo: theirs('--src-tls-verify=false', remote, `oci:${dest}:latest`) },
    () => rm(dest, { recursive: true, force: true }),
  )
  table.push(compare('pull docker -> oci', times, CASES.pull))
}
if (only.includes('repush')) {
  // a bare `node -e 0`, alternated with the others: the start-up floor of any Node.js CLI
  const times = await timeAlternating(
    'repush',
    { ours: ours('--dest-tls-verify=false', src, remote), skopeo: theirs('--dest-tls-verify=false', src, remote), node: [process.execPath, ['-e', '0']] },
    async () => {},
  )
  const row = compare('re-push, every blob present', times, CASES.repush)
  row.medianNodeStartup = times.times.node ? round3(median(times.times.node)) : null
  table.push(row)
}
await stopRegistry()

printTable(table)
const floor = table.find((r) => typeof r.medianNodeStartup === 'number')
if (floor?.medianSkopeo) {
  console.log(`\nre-push floor: a bare \`node -e 0\` takes ${floor.medianNodeStartup.toFixed(3)} s, ${(floor.medianNodeStartup / floor.medianSkopeo).toFixed(2)} x skopeo's whole re-push`)
}
results.machine.loadavgAtEnd = loadavg()
results.cases = table
const out = join(ROOT, 'bench', 'docker-results.json')
writeFileSync(out, JSON.stringify(results, null, 2) + '\n')
console.log(`\nwrote ${out}`)
process.exitCode = failed ? 1 : 0

// ---- helpers ---------------------------------------------------------------------------------

/** Runs each command `runs` times, alternating them, after one untimed warm-up of each. */
async function timeAlternating(name, cmds, prepare) {
  const times = Object.fromEntries(Object.keys(cmds).map((k) => [k, []]))
  const cpu = Object.fromEntries(Object.keys(cmds).map((k) => [k, []]))
  log(`${name}: ${Object.keys(cmds).join(' / ')}, ${runs} runs each (+1 warm-up)`)
  for (let round = 0; round <= runs; round++) {
    for (const [key, [cmd, args]] of Object.entries(cmds)) {
      if (times[key] === null) continue
      await prepare()
      const t0 = performance.now()
      const r = await exec(cmd, args)
      const seconds = (performance.now() - t0) / 1000
      if (r.code !== 0) {
        failed = true
        times[key] = null
        console.error(`  ${key} failed (exit ${r.code}): ${cmd} ${args.join(' ')}\n    ${r.stderr.trim().split('\n').slice(-5).join('\n    ')}`)
        continue
      }
      if (round > 0) {
        times[key].push(seconds)
        if (r.cpu !== undefined) cpu[key].push(r.cpu)
      }
    }
  }
  return { times, cpu }
}

function compare(label, { times, cpu }, target) {
  const ma = times.ours ? median(times.ours) : null
  const mb = times.skopeo ? median(times.skopeo) : null
  const ratio = ma !== null && mb !== null ? ma / mb : null
  if (ratio === null || ratio > target) failed = true
  const cpuOurs = times.ours && cpu.ours.length ? median(cpu.ours) : null
  const cpuSkopeo = times.skopeo && cpu.skopeo.length ? median(cpu.skopeo) : null
  return {
    label, runsOurs: times.ours, runsSkopeo: times.skopeo, medianOurs: round3(ma), medianSkopeo: round3(mb), ratio: round3(ratio), target,
    pass: ratio !== null && ratio <= target, cpuOurs: round3(cpuOurs), cpuSkopeo: round3(cpuSkopeo),
  }
}

function printTable(rows) {
  const head = ['case', 'ours (s)', 'skopeo (s)', 'ratio', 'target', '', 'cpu ours', 'cpu skopeo']
  const lines = rows.map((r) => [
    r.label,
    r.medianOurs?.toFixed(3) ?? 'error',
    r.medianSkopeo?.toFixed(3) ?? 'error',
    r.ratio?.toFixed(3) ?? '-',
    `<= ${r.target.toFixed(1)}`,
    r.ratio === null ? '' : r.pass ? 'ok' : 'MISS',
    r.cpuOurs?.toFixed(2) ?? '-',
    r.cpuSkopeo?.toFixed(2) ?? '-',
  ])
  const widths = head.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i].length)))
  const fmt = (cells) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd()
  console.log(`\n${fmt(head)}\n${widths.map((w) => '-'.repeat(w)).join('  ')}`)
  for (const l of lines) console.log(fmt(l))
}

/** Runs a command; resolves its exit code, stderr tail and (with /usr/bin/time) user+sys seconds. */
function exec(cmd, args) {
  const usage = join(work, 'time.txt')
  const [file, argv] = TIME ? [TIME, ['-f', '%U %S', '-o', usage, cmd, ...args]] : [cmd, args]
  return new Promise((resolvePromise, reject) => {
    const child = spawn(file, argv, { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (s) => (stderr = (stderr + s).slice(-20_000)))
    child.on('error', reject)
    child.on('close', (code, signal) => {
      let cpu
      if (TIME) {
        const [user, sys] = readFileSync(usage, 'utf8').trim().split('\n').pop().split(' ').map(Number)
        if (Number.isFinite(user) && Number.isFinite(sys)) cpu = user + sys
      }
      resolvePromise({ code: code ?? (signal ? 128 : 1), stderr, cpu })
    })
  })
}







