#!/usr/bin/env node
// Builds the CLI's startup snapshot, dist/cli.blob, for the Node.js running this script, from
// dist/cli-snapshot.cjs (see src/cli/snapshot.ts), and records that Node.js in
// dist/cli.blob.node (its path, then its version) for bin/blobcache, which uses the snapshot only
// with that same executable. A snapshot only loads in the Node.js that built it, so it is built
// where the CLI runs: by `npm run build`, and after `npm install` of the package (postinstall).
//
//   node scripts/build-snapshot.mjs [--quiet]
//
// Without dist/cli-snapshot.cjs (a checkout before its first build) it does nothing. A failure
// leaves no snapshot (the CLI then starts from dist/cli.js) and exits 0 with --quiet, else 1.
import { spawnSync } from 'node:child_process'
import { existsSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const quiet = process.argv.includes('--quiet')
const dist = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'dist')
const script = join(dist, 'cli-snapshot.cjs')
const blob = join(dist, 'cli.blob')
const marker = join(dist, 'cli.blob.node')

if (!existsSync(script)) process.exit(0)
const tmp = join(dist, `.tmp-cli-${process.pid}.blob`)
rmSync(marker, { force: true }) // bin/blobcache ignores the blob while the marker is missing
// The builder warns that some built-in modules are "not yet fully verified" in snapshots; the
// ones the CLI loads at start-up are checked by test/integration/cli-snapshot.test.ts.
const run = spawnSync(process.execPath, ['--snapshot-blob', tmp, '--build-snapshot', script], {
  cwd: dist,
  encoding: 'utf8',
  env: { ...process.env, DEBUG: '' },
})
if (run.status !== 0 || !existsSync(tmp)) {
  rmSync(tmp, { force: true })
  rmSync(blob, { force: true })
  const why = run.error?.message ?? (run.stderr.trim().split('\n').slice(-3).join('\n') || `exit ${run.status}`)
  process.stderr.write(`blobcache: no startup snapshot (the CLI starts from dist/cli.js): ${why}\n`)
  process.exit(quiet ? 0 : 1)
}
renameSync(tmp, blob)
writeFileSync(marker, `${process.execPath}\n${process.version}\n`)
if (!quiet) process.stderr.write(`blobcache: startup snapshot dist/cli.blob built for ${process.execPath} ${process.version}\n`)
