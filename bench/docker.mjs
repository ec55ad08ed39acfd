#!/usr/bin/env node
// Benchmarks docker:// copies of the blobcache CLI against skopeo, side by side in one run, against
// a real registry (Debian's docker-registry) on 127.0.0.1:
//
//   push     oci: -> docker://   into an empty registry (fresh storage before every run)
//   pull     docker:// -> oci:   into a fresh layout
//   repush   oci: -> docker://   when the registry already holds the image under that tag
//   blobs    oci: -> docker://   when the registry holds every blob but not the manifest (it is
//                                deleted by digest before each run): HEAD of every blob, then the
//                                manifest PUT, the re-push of tools that do not ask for the
//                                manifest first (skopeo always works this way)
//
//   node bench/docker.mjs [--runs N] [--only push,pull,repush,blobs] [--cache DIR] [--cli bin/blobcache]
//
// The image is bench/make-image.mjs's 4 x 64 MiB one (shared with bench/run.mjs through the same
// cache directory). Commands alternate run by run after one untimed warm-up each; medians and
// ratios (ours / skopeo) are printed and written to bench/docker-results.json. When
// /usr/bin/time is there, the user+sys CPU time of each command is recorded too (the registry's
// own CPU is not included): on a shared machine it is steadier than the wall time.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join, resolve } from 'node:path'
import {
  baseImage, benchArgs, cliRun, benchRegistry, benchWorkDir, builtCli, cliOption, exec, log, machineInfo, median, printColumns,
  requireTools, round3, skopeoPolicy, timeAlternating, usage, versus, writeResults,
} from './util.mjs'

const CASES = { push: 0.8, pull: 0.8, repush: 2.0, blobs: null }

const { opts, runs } = benchArgs('usage: node bench/docker.mjs [--runs N] [--only push,pull,repush,blobs] [--cache DIR] [--cli PATH]', {
  only: { type: 'string' },
  cli: cliOption,
})
const only = opts.only ? opts.only.split(',').map((s) => s.trim()) : Object.keys(CASES)
for (const c of only) if (!(c in CASES)) usage(`unknown case ${c}; cases: ${Object.keys(CASES).join(' ')}`)
const CLI = builtCli(opts.cli)
const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined
requireTools('docker-registry', 'skopeo')

let registry
const work = benchWorkDir('blobcache-bench-docker-', () => registry?.killNow())
const policy = skopeoPolicy(work)

// ---- image and registry ----------------------------------------------------------------------
const { base } = await baseImage(resolve(opts.cache))
registry = await benchRegistry(work)
const { host } = registry
const startRegistry = (wipe) => registry.start(wipe)
const stopRegistry = () => registry.stop()

// ---- cases -----------------------------------------------------------------------------------
const src = `oci:${base}:latest`
const remote = `docker://${host}/bench/app:latest`
const dest = join(work, 'pulled')
const ours = (...args) => cliRun(CLI, ['copy', '-q', ...args])
const theirs = (...args) => ['skopeo', ['--policy', policy, 'copy', '-q', ...args]]
const results = {
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadavgAtStart: loadavg() },
  skopeo: execFileSync('skopeo', ['--version'], { encoding: 'utf8' }).trim(),
  registry: execFileSync('docker-registry', ['--version'], { encoding: 'utf8' }).trim(),
  runs,
  cases: [],
}
const table = []
let failed = false

if (only.includes('push')) {
  const times = await timeCase(
    'push',
    { ours: ours('--dest-tls-verify=false', src, remote), skopeo: theirs('--dest-tls-verify=false', src, remote) },
    () => startRegistry(true),
  )
  table.push(compare('push oci -> docker (empty registry)', times, CASES.push))
}

if (['pull', 'repush', 'blobs'].some((c) => only.includes(c))) {
  await startRegistry(true)
  const seeded = await exec(...theirs('--dest-tls-verify=false', src, remote))
  if (seeded.code !== 0) throw new Error(`seeding the registry failed: ${seeded.stderr}`)
}
if (only.includes('pull')) {
  const times = await timeCase(
    'pull',
    { ours: ours('--src-tls-verify=false', remote, `oci:${dest}:latest`), skopeo: theirs('--src-tls-verify=false', remote, `oci:${dest}:latest`) },
    () => rm(dest, { recursive: true, force: true }),
  )
  table.push(compare('pull docker -> oci', times, CASES.pull))
}
if (only.includes('repush')) {
  // a bare `node -e 0`, alternated with the others: the start-up floor of any Node.js CLI,
  // started the way bin/blobcache starts node (from sh, NODE_EXTRA_CA_CERTS handed over)
  const times = await timeCase('repush', {
    ours: ours('--dest-tls-verify=false', src, remote),
    skopeo: theirs('--dest-tls-verify=false', src, remote),
    node: ['sh', ['-c', 'unset NODE_EXTRA_CA_CERTS; exec "$0" -e 0', process.execPath]],
  })
  const row = compare('re-push, every blob present', times, CASES.repush)
  row.medianNodeStartup = times.times.node ? round3(median(times.times.node)) : null
  table.push(row)
}
if (only.includes('blobs')) {
  const times = await timeCase(
    'blobs',
    { ours: ours('--dest-tls-verify=false', src, remote), skopeo: theirs('--dest-tls-verify=false', src, remote) },
    deleteManifest,
  )
  table.push(compare('push, every blob present, manifest not', times, CASES.blobs))
}
await stopRegistry()

printTable(table)
const floor = table.find((r) => typeof r.medianNodeStartup === 'number')
if (floor?.medianSkopeo) {
  console.log(`\nre-push floor: a bare \`node -e 0\` (from sh, as bin/blobcache starts it) takes ${floor.medianNodeStartup.toFixed(3)} s, ${(floor.medianNodeStartup / floor.medianSkopeo).toFixed(2)} x skopeo's whole re-push`)
  if (process.env.NODE_EXTRA_CA_CERTS) {
    console.log('(NODE_EXTRA_CA_CERTS is set here: any other node would spend 40-60 ms more parsing it at start-up; bin/blobcache defers it)')
  }
}
results.machine.loadavgAtEnd = loadavg()
results.cases = table
writeResults('docker-results.json', results)
process.exitCode = failed ? 1 : 0

// ---- helpers ---------------------------------------------------------------------------------

/** Deletes the manifest the benchmark's tag names, with skopeo (which deletes it by digest, as the API wants). */
async function deleteManifest() {
  const r = await exec('skopeo', ['delete', '--tls-verify=false', remote])
  if (r.code !== 0) throw new Error(`skopeo delete ${remote}: ${r.stderr.trim()}`)
}

/** Times the commands of one case, alternated (timeAlternating), with their CPU seconds. */
async function timeCase(name, cmds, prepare) {
  log(`${name}: ${Object.keys(cmds).join(' / ')}, ${runs} runs each (+1 warm-up)`)
  const r = await timeAlternating({ cmds, runs, prepare, exec: execCpu })
  if (r.failed) failed = true
  return r
}

function compare(label, { times, cpu }, target) {
  const row = versus(label, times.ours, times.skopeo, target)
  if (row.pass === false) failed = true
  const cpuOurs = times.ours && cpu.ours.length ? median(cpu.ours) : null
  const cpuSkopeo = times.skopeo && cpu.skopeo.length ? median(cpu.skopeo) : null
  return { ...row, cpuOurs: round3(cpuOurs), cpuSkopeo: round3(cpuSkopeo) }
}

function printTable(rows) {
  const head = ['case', 'ours (s)', 'skopeo (s)', 'ratio', 'target', '', 'cpu ours', 'cpu skopeo']
  const lines = rows.map((r) => [
    r.label,
    r.medianOurs?.toFixed(3) ?? 'error',
    r.medianSkopeo?.toFixed(3) ?? 'error',
    r.ratio?.toFixed(3) ?? '-',
    r.target === null ? 'info' : `<= ${r.target.toFixed(1)}`,
    r.ratio === null || r.pass === null ? '' : r.pass ? 'ok' : 'MISS',
    r.cpuOurs?.toFixed(2) ?? '-',
    r.cpuSkopeo?.toFixed(2) ?? '-',
  ])
  printColumns(head, lines)
}

/** Runs a command (exec); with /usr/bin/time, its user+sys seconds come back as `cpu`. */
async function execCpu(cmd, args) {
  if (!TIME) return exec(cmd, args)
  const usageFile = join(work, 'time.txt')
  const r = await exec(TIME, ['-f', '%U %S', '-o', usageFile, cmd, ...args])
  const [user, sys] = readFileSync(usageFile, 'utf8').trim().split('\n').pop().split(' ').map(Number)
  return Number.isFinite(user) && Number.isFinite(sys) ? { ...r, cpu: user + sys } : r
}
