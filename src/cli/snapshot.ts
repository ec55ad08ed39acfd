// The script of the CLI's startup snapshot (bundled to dist/cli-snapshot.cjs; see
// scripts/snapshot.mjs): `node --snapshot-blob dist/cli.blob --build-snapshot` runs it once, with
// every module of the CLI loaded and evaluated, and saves Node's heap; `node --snapshot-blob
// dist/cli.blob -- ARGS` (what bin/blobcache runs) then starts from that heap and calls the
// function set here, without reading, compiling or evaluating any module. On this project's
// machines that saves about 30 ms of the 130 ms a short command takes.
//
// Nothing may depend on the environment of the build at run time: the modules read none at load
// time, except `debug`, which reads DEBUG (bin/blobcache starts dist/cli.js instead when DEBUG or
// DEBUG_* is set; the namespaces are read again here all the same).
import { dirname, resolve } from 'node:path'
import { Writable } from 'node:stream'
import { startupSnapshot } from 'node:v8'
import debug from 'debug'
import { setRequireBase } from '../lazy-require.js'
import { createProgram, runProcess } from './main.js'

if (!startupSnapshot.isBuildingSnapshot()) {
  process.stderr.write('blobcache: cli-snapshot.cjs builds a startup snapshot: run dist/cli.js, or bin/blobcache\n')
  process.exitCode = 2
} else {
  warmUp()
  startupSnapshot.setDeserializeMainFunction(() => {
    debug.enable(process.env.DEBUG ?? '')
    // packages (zstd-napi, cli-progress) are found from the dist/ the snapshot is started from
    const at = process.execArgv.findIndex((a) => a === '--snapshot-blob' || a.startsWith('--snapshot-blob='))
    const blob = at < 0 ? undefined : process.execArgv[at].includes('=') ? process.execArgv[at].split('=')[1] : process.execArgv[at + 1]
    if (blob) setRequireBase(resolve(dirname(blob), 'cli-snapshot.cjs'))
    // argv is [node, ...ARGS]: bin/blobcache passes `--` so that Node takes none of them
    runProcess(process.argv.slice(1))
  })
}

/**
 * Builds the command tree and has commander parse a help request into nothing, while the
 * snapshot is built: the functions this runs are compiled then, so a command does not compile
 * them again at start-up. Nothing of it stays reachable.
 */
function warmUp(): void {
  const sink = new Writable({ write: (_chunk, _enc, cb) => cb() })
  const ctx = { io: { stdout: sink, stderr: sink, isTTY: false, env: {} }, signal: new AbortController().signal, exitCode: 0 }
  for (const argv of [['--help'], ['copy', '--help'], ['image-cache', '--help'], ['inspect', '--help'], ['cache', '--help']]) {
    try {
      createProgram(ctx).parse(argv, { from: 'user' })
    } catch {
      // commander ends a help request by throwing (exitOverride)
    }
  }
}
