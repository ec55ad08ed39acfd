#!/usr/bin/env node
// The soak: the reliability suite (test/reliability/) run at a larger scale, bounded in count
// and in time, with its figures collected and summed up.
//
//   npm run soak                         build, then every suite at soak scale (about 6 minutes on 2 cores)
//   node test/reliability/soak.mjs --kills 100 --minutes 30
//   node test/reliability/soak.mjs --only crash,concurrency --seed 1234
//
// Scale knobs reach the tests as BLOBCACHE_SOAK_* variables (see test/helpers/children.ts);
// each suite appends its figures to a JSON-lines report, summed up here and written to
// --out (default: soak-results.json in the system's temp directory). The exit code is the
// suite's. The suite is stopped (by its pid) when --minutes is exceeded.
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const SUITES = {
  crash: 'test/reliability/crash.test.ts',
  concurrency: 'test/reliability/concurrency.test.ts',
  'disk-full': 'test/reliability/disk-full.test.ts',
  faults: 'test/reliability/registry-faults.test.ts',
  properties: 'test/reliability/properties.test.ts',
  tar: 'test/reliability/hostile-tar.test.ts',
  input: 'test/reliability/hostile-input.test.ts',
}

const { values: opts } = parseArgs({
  options: {
    kills: { type: 'string', default: '60' },
    minutes: { type: 'string', default: '25' },
    only: { type: 'string' },
    seed: { type: 'string' },
    out: { type: 'string' },
  },
})
const minutes = Number(opts.minutes)
const kills = Number(opts.kills)
if (!(minutes > 0) || !(kills > 0)) {
  console.error('usage: soak.mjs [--kills N] [--minutes M] [--only crash,concurrency,disk-full,faults,properties,tar,input] [--seed S] [--out FILE]')
  process.exit(2)
}
const only = opts.only ? opts.only.split(',') : Object.keys(SUITES)
for (const name of only) {
  if (!SUITES[name]) {
    console.error(`unknown suite ${name}; known: ${Object.keys(SUITES).join(', ')}`)
    process.exit(2)
  }
}
if (!existsSync(join(ROOT, 'dist', 'index.js'))) {
  console.error('dist/index.js is missing: run `npm run soak` (it builds first)')
  process.exit(2)
}

const work = mkdtempSync(join(tmpdir(), 'blobcache-soak-'))
const report = join(work, 'figures.jsonl')
const seed = opts.seed ?? String((Date.now() % 2_147_483_647) + 1)
// the time left after the fixed-size suites goes to the kill rounds, which stop at their cap
const crashSeconds = Math.max(60, Math.round(minutes * 60 * 0.45))
const env = {
  ...process.env,
  BLOBCACHE_RELIABILITY_REPORT: report,
  BLOBCACHE_RELIABILITY_SEED: seed,
  BLOBCACHE_SOAK_KILLS: String(kills),
  BLOBCACHE_SOAK_CRASH_SECONDS: String(crashSeconds),
  BLOBCACHE_SOAK_SCALE: '2',
  BLOBCACHE_SOAK_CONCURRENCY_ROUNDS: '3',
  BLOBCACHE_SOAK_FAULT_CASES: '300',
  BLOBCACHE_SOAK_PROPERTY_RUNS: '5000',
  BLOBCACHE_SOAK_TAR_RUNS: '1000',
  BLOBCACHE_SOAK_INPUT_RUNS: '300',
}
delete env.DEBUG

const vitest = join(dirname(createRequire(import.meta.url).resolve('vitest/package.json')), 'vitest.mjs')
const files = only.map((n) => SUITES[n])
const args = [vitest, 'run', ...files, `--testTimeout=${(minutes * 60 + 60) * 1000}`, '--hookTimeout=300000', '--fileParallelism=false']
console.log(`soak: ${only.join(', ')}; ${kills} kills (cap ${crashSeconds} s), seed ${seed}, at most ${minutes} min`)
const started = Date.now()
const child = spawn(process.execPath, args, { cwd: ROOT, env, stdio: 'inherit' })
const cap = setTimeout(() => {
  console.error(`soak: over ${minutes} minutes, stopping the suite (pid ${child.pid})`)
  process.kill(child.pid, 'SIGTERM')
  setTimeout(() => child.exitCode === null && process.kill(child.pid, 'SIGKILL'), 10_000).unref()
}, minutes * 60_000)
const code = await new Promise((res) => child.on('close', (c, signal) => res(c ?? (signal ? 1 : 0))))
clearTimeout(cap)

const lines = existsSync(report) ? readFileSync(report, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)) : []
const bySuite = {}
for (const l of lines) (bySuite[l.suite] ??= []).push(l)
const sum = (suite, key) => (bySuite[suite] ?? []).reduce((n, l) => n + (typeof l[key] === 'number' ? l[key] : 0), 0)
const summary = {
  seed: Number(seed),
  minutes: Math.round((Date.now() - started) / 600) / 100,
  exitCode: code,
  crash: { kills: sum('crash', 'kills'), recoveries: sum('crash', 'recoveries'), filesHashed: sum('crash', 'filesHashed'), corrupt: sum('crash', 'corrupt'), tempLeftovers: sum('crash', 'leftovers'), killedDuring: bySuite.crash?.[0]?.killedDuring },
  concurrency: { rounds: sum('concurrency', 'rounds'), processes: sum('concurrency', 'processes'), imagesWritten: sum('concurrency', 'imagesWritten'), filesHashed: sum('concurrency', 'filesHashed'), corrupt: sum('concurrency', 'corrupt') },
  diskFull: { copies: sum('disk-full', 'copies'), cacheWriteErrors: sum('disk-full', 'cacheWriteErrors'), destinationFailures: sum('disk-full', 'destinationFailures'), corrupt: sum('disk-full', 'corrupt') },
  registryFaults: { cases: sum('registry-faults', 'cases'), faultsInjected: sum('registry-faults', 'faultsInjected'), succeeded: sum('registry-faults', 'succeeded'), failedTyped: sum('registry-faults', 'failed'), corrupt: sum('registry-faults', 'corrupt'), codes: bySuite['registry-faults']?.[0]?.codes },
  properties: bySuite.properties?.[0] ?? null,
  hostileTar: bySuite['hostile-tar']?.[0] ?? null,
  hostileInput: bySuite['hostile-input']?.[0] ?? null,
}
const out = opts.out ?? join(tmpdir(), 'soak-results.json')
writeFileSync(out, JSON.stringify({ summary, figures: lines }, null, 2) + '\n')
console.log('\nsoak figures:')
console.log(JSON.stringify(summary, null, 2))
console.log(`written to ${out}`)
rmSync(work, { recursive: true, force: true })
process.exit(code)
