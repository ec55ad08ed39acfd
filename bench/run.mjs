#!/usr/bin/env node
// Benchmarks the blobcache CLI against skopeo on this machine, side by side in one run.
//
//   npm run bench                       build, then every case with 5 timed runs each
//   node bench/run.mjs --runs 9         more runs
//   node bench/run.mjs --only oci-dir,rss
//
// Cases (names for --only): oci-dir oci-oci oci-oci-archive oci-archive-oci dir-oci rss
// cache-cold cache-warm compress. Commands of a case are alternated run by run, each run gets a fresh
// destination (removed before it, outside the timing), and one untimed warm-up run of each
// command comes first. Prints medians and ratios, and writes bench/results.json.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { mkdir, rm } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join, resolve } from 'node:path'
import { ensureDirImage, ensureOciImage } from './make-image.mjs'
import {
  BASE_IMAGE, ROOT, benchArgs, cliRun, benchWorkDir, builtCli, exec, log, machineInfo, median, printColumns, round3, skopeoPolicy,
  timeAlternating, usage, which, writeResults,
} from './util.mjs'

const MiB = 1 << 20

const CASES = ['oci-dir', 'oci-oci', 'oci-oci-archive', 'oci-archive-oci', 'dir-oci']
const ALL = [...CASES, 'rss', 'cache-cold', 'cache-warm', 'compress']

const { opts, runs } = benchArgs(
  'usage: node bench/run.mjs [--runs N] [--only CASE[,CASE…]] [--cache DIR] [--no-warmup]\n' +
    `cases: ${ALL.join(' ')}\n` +
    'images are generated once and kept in --cache (default $TMPDIR/blobcache-bench-v1)',
  { only: { type: 'string' }, 'no-warmup': { type: 'boolean', default: false } },
)
const only = opts.only ? opts.only.split(',').map((s) => s.trim()).filter(Boolean) : ALL
for (const c of only) if (!ALL.includes(c)) usage(`unknown case ${c}; cases: ${ALL.join(' ')}`)
builtCli(join(ROOT, 'dist', 'cli.js'), 'run `npm run build` first (npm run bench does)')
// bin/blobcache, as users run it: from the startup snapshot `npm run build` makes
const CLI = join(ROOT, 'bin', 'blobcache')

const skopeoBin = which('skopeo')
const timeBin = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined
const work = benchWorkDir('blobcache-bench-run-')
const policy = skopeoPolicy(work)

const results = {
  date: new Date().toISOString(),
  machine: { ...machineInfo(), loadavgAtStart: loadavg() },
  skopeo: skopeoBin ? execFileSync(skopeoBin, ['--version'], { encoding: 'utf8' }).trim() : null,
  runs,
  cases: [],
  rss: null,
  cache: [],
}
let failed = false

// ---- images --------------------------------------------------------------------------------
const cacheDir = resolve(opts.cache)
await mkdir(cacheDir, { recursive: true })
const base = join(cacheDir, 'oci-4x64')
if (!existsSync(join(base, '.complete.json'))) log(`generating the images in ${cacheDir} (first run only: about a minute)`)
const baseMeta = await ensureOciImage(base, BASE_IMAGE)
const dirImage = join(cacheDir, 'dir-4x64')
await ensureDirImage(dirImage, base, baseMeta)
const archive = join(cacheDir, 'oci-4x64.tar')
if (!existsSync(archive)) {
  execFileSync('tar', ['-C', base, '-cf', `${archive}.tmp`, 'oci-layout', 'index.json', 'blobs'])
  execFileSync('mv', [`${archive}.tmp`, archive])
}
log(
  `image: 4 layers x 64 MiB content (half random, half text), gzip: ` +
    `${(baseMeta.blobBytes / MiB).toFixed(1)} MiB of blobs, manifest ${baseMeta.manifestDigest.slice(0, 19)}…`,
)

// ---- copy cases ------------------------------------------------------------------------------
const dest = join(work, 'dest')
const destArchive = join(work, 'dest.tar')
const sources = {
  oci: `oci:${base}:latest`,
  dir: `dir:${dirImage}`,
  'oci-archive': `oci-archive:${archive}:latest`,
}
const destinations = {
  dir: `dir:${dest}`,
  oci: `oci:${dest}:latest`,
  'oci-archive': `oci-archive:${destArchive}:latest`,
}
const clean = () => Promise.all([rm(dest, { recursive: true, force: true }), rm(destArchive, { force: true })])
const ours = (src, dst, extra = []) => cliRun(CLI, ['copy', '-q', ...extra, src, dst])
const theirs = (src, dst) => [skopeoBin, ['--policy', policy, 'copy', '-q', src, dst]]

const table = []
for (const name of CASES.filter((c) => only.includes(c))) {
  const [from, to] = splitCase(name)
  const src = sources[from]
  const dst = destinations[to]
  const cmds = { ours: ours(src, dst) }
  if (skopeoBin) cmds.skopeo = theirs(src, dst)
  const times = await timeCase(name, cmds, clean)
  const row = compare(`${from} -> ${to}`, times, 'ours', 'skopeo', 0.6)
  results.cases.push({ name, src, dst, ...row })
  table.push(row)
}

// ---- blob cache cases (issue 3), when the CLI has --blob-cache ----------------------------------
const wantCache = only.includes('cache-cold') || only.includes('cache-warm')
if (wantCache && !cliHas('--blob-cache')) {
  log('cache cases skipped: this build of the CLI has no `copy --blob-cache`')
} else if (wantCache) {
  const blobCache = join(work, 'blob-cache')
  const src = sources.oci
  const dst = destinations.dir
  if (only.includes('cache-cold')) {
    const cmds = { cold: ours(src, dst, ['--blob-cache', blobCache]), ours: ours(src, dst) }
    if (skopeoBin) cmds.skopeo = theirs(src, dst)
    const times = await timeCase('cache-cold', cmds, () =>
      Promise.all([clean(), rm(blobCache, { recursive: true, force: true })]),
    )
    const a = compare('cold cache vs skopeo', times, 'cold', 'skopeo', 1.0)
    const b = compare('cold cache vs no cache', times, 'cold', 'ours', 2.0)
    results.cache.push({ name: 'cache-cold-vs-skopeo', ...a }, { name: 'cache-cold-vs-ours', ...b })
    table.push(a, b)
  }
  if (only.includes('cache-warm')) {
    await rm(blobCache, { recursive: true, force: true })
    await clean()
    await exec(...ours(src, dst, ['--blob-cache', blobCache])) // fills the cache
    const cmds = { warm: ours(src, dst, ['--blob-cache', blobCache]), ours: ours(src, dst) }
    const times = await timeCase('cache-warm', cmds, clean)
    const row = compare('warm cache vs no cache', times, 'warm', 'ours', 0.5)
    results.cache.push({ name: 'cache-warm-vs-ours', ...row })
    table.push(row)
  }
}

// ---- gzip compression (information): the image with zstd layers, recompressed as gzip ----------
if (only.includes('compress')) {
  const zstdImage = join(cacheDir, 'oci-4x64-zstd')
  if (!existsSync(join(zstdImage, '.complete'))) {
    await rm(zstdImage, { recursive: true, force: true })
    execFileSync(...cliRun(CLI, ['copy', '-q', '--dest-compress-format', 'zstd', sources.oci, `oci:${zstdImage}:latest`]))
    execFileSync('touch', [join(zstdImage, '.complete')])
  }
  const src = `oci:${zstdImage}:latest`
  const cmds = { ours: ours(src, destinations.oci, ['--dest-compress-format', 'gzip']) }
  if (skopeoBin) cmds.skopeo = [skopeoBin, ['--policy', policy, 'copy', '-q', '--dest-compress-format', 'gzip', src, destinations.oci]]
  const times = await timeCase('compress', cmds, clean)
  const row = compare('zstd -> gzip, oci -> oci', times, 'ours', 'skopeo', null)
  results.cases.push({ name: 'compress', src, dst: destinations.oci, ...row })
  table.push(row)
}

printTable(table)

// ---- peak memory ---------------------------------------------------------------------------
if (only.includes('rss')) {
  const big = join(cacheDir, 'oci-1x1024')
  if (!existsSync(join(big, '.complete.json'))) log('generating the 1 GiB layer image (first run only)')
  const bigMeta = await ensureOciImage(big, { layers: 1, layerBytes: 1024 * MiB, randomShare: 1, level: 1, filesPerLayer: 16 })
  const src = `oci:${big}:latest`
  await clean()
  const oursRss = await peakRss(...ours(src, destinations.dir))
  let skopeoRss
  if (skopeoBin) {
    await clean()
    skopeoRss = await peakRss(...theirs(src, destinations.dir))
  }
  await clean()
  const layerMiB = bigMeta.layers[0].size / MiB
  results.rss = {
    layerMiB: Number(layerMiB.toFixed(1)),
    method: timeBin ? '/usr/bin/time -f %M' : '/proc/<pid>/status VmHWM',
    oursMiB: oursRss?.mib ?? null,
    oursSeconds: oursRss?.seconds ?? null,
    skopeoMiB: skopeoRss?.mib ?? null,
    skopeoSeconds: skopeoRss?.seconds ?? null,
    targetMiB: 150,
    pass: oursRss ? oursRss.mib <= 150 : false,
  }
  if (!oursRss) failed = true
  console.log(
    `\npeak RSS copying one ${layerMiB.toFixed(0)} MiB layer oci -> dir (${results.rss.method}):` +
      `\n  ours   ${fmtMiB(oursRss)}   target <= 150 MiB  ${oursRss ? (results.rss.pass ? 'ok' : 'MISS') : 'ERROR'}` +
      (skopeoBin ? `\n  skopeo ${fmtMiB(skopeoRss)}` : ''),
  )
}

results.machine.loadavgAtEnd = loadavg()
writeResults('results.json', results)
process.exitCode = failed ? 1 : 0

// ---- helpers -----------------------------------------------------------------------------------

/**
 * Times the commands of one case, alternated (timeAlternating), with a fresh `prepare()` before
 * each run and once after the last; resolves the seconds per command, rounded, null when it failed.
 */
async function timeCase(name, cmds, prepare) {
  log(`${name}: ${Object.keys(cmds).join(' / ')}, ${runs} runs each`)
  const r = await timeAlternating({ cmds, runs, prepare, warmup: !opts['no-warmup'] })
  await prepare()
  if (r.failed) failed = true
  return Object.fromEntries(Object.entries(r.times).map(([key, ts]) => [key, ts && ts.map(round3)]))
}

function compare(label, times, a, b, target) {
  const ma = times[a] ? median(times[a]) : null
  const mb = times[b] ? median(times[b]) : null
  const ratio = ma !== null && mb !== null ? ma / mb : null
  return {
    label,
    a,
    b,
    runsA: times[a],
    runsB: times[b],
    medianA: round3(ma),
    medianB: round3(mb),
    ratio: round3(ratio),
    target,
    pass: ratio !== null && (target === null || ratio <= target),
  }
}

function printTable(rows) {
  if (rows.length === 0) return
  const head = ['case', 'median A (s)', 'median B (s)', 'A/B', 'target', '']
  const lines = rows.map((r) => [
    `${r.label} [${r.a}/${r.b}]`,
    r.medianA?.toFixed(3) ?? 'error',
    r.medianB?.toFixed(3) ?? (r.runsB === undefined ? 'n/a' : 'error'),
    r.ratio?.toFixed(3) ?? '-',
    r.target === null ? '(info)' : `<= ${r.target.toFixed(1)}`,
    r.ratio === null || r.target === null ? '' : r.pass ? 'ok' : 'MISS',
  ])
  printColumns(head, lines)
}

/** Peak resident memory of one run, in MiB, by /usr/bin/time or by polling VmHWM. */
async function peakRss(cmd, args) {
  const t0 = performance.now()
  if (timeBin) {
    const r = await exec(timeBin, ['-f', 'BLOBCACHE_BENCH_RSS %M', cmd, ...args])
    const seconds = (performance.now() - t0) / 1000
    const m = /BLOBCACHE_BENCH_RSS (\d+)/.exec(r.stderr)
    if (r.code !== 0 || !m) {
      console.error(`  ${cmd} failed (exit ${r.code}): ${r.stderr.trim().split('\n').slice(-5).join('\n    ')}`)
      return undefined
    }
    return { mib: round3(Number(m[1]) / 1024), seconds: round3(seconds) }
  }
  let peakKiB = 0
  const watch = (child) => {
    const timer = setInterval(() => {
      try {
        const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))
        if (m) peakKiB = Math.max(peakKiB, Number(m[1]))
      } catch {
        // exited between polls
      }
    }, 20)
    return () => clearInterval(timer)
  }
  const r = await exec(cmd, args, { watch })
  if (r.code !== 0) return undefined
  return { mib: round3(peakKiB / 1024), seconds: round3((performance.now() - t0) / 1000) }
}

function cliHas(flag) {
  try {
    return execFileSync(...cliRun(CLI, ['copy', '--help']), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).includes(flag)
  } catch (err) {
    return String(err.stdout ?? '').includes(flag)
  }
}

function splitCase(name) {
  const i = name.startsWith('oci-archive-') ? 'oci-archive'.length : name.indexOf('-')
  return [name.slice(0, i), name.slice(i + 1)]
}

function fmtMiB(r) {
  return r ? `${r.mib.toFixed(1).padStart(7)} MiB in ${r.seconds.toFixed(2)} s` : 'error'
}
