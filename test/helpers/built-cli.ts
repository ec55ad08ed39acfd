// The built `blobcache` command as users start it: bin/blobcache, which runs the CLI from its
// startup snapshot (dist/cli.blob) when `npm run build` made one for this Node.js, else
// dist/cli.js. BLOBCACHE_NO_SNAPSHOT=1 in the test environment runs dist/cli.js everywhere.
import { existsSync } from 'node:fs'
import { resolve } from 'node:path'

const ROOT = resolve(__dirname, '../..')

/** The launcher. */
export const LAUNCHER = resolve(ROOT, 'bin/blobcache')
/** The plain ES-module CLI the launcher falls back to. */
export const CLI_JS = resolve(ROOT, 'dist/cli.js')
/** The startup snapshot and its marker (present after `npm run build` on a machine that can build one). */
export const SNAPSHOT = resolve(ROOT, 'dist/cli.blob')

/** True when the CLI is built (`npm run build`). */
export function cliBuilt(): boolean {
  return existsSync(CLI_JS)
}

/** The command and arguments that run `blobcache ...args` (for spawn). */
export function cliCommand(args: string[]): [string, string[]] {
  return [LAUNCHER, args]
}

/** Runs a command to its end; resolves its exit code and output (a non-zero exit does not reject). */
export async function runCommand(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ code: number; stdout: string; stderr: string }> {
  const { execFile } = await import('node:child_process')
  return new Promise((resolve) => {
    execFile(cmd, args, { env, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : -1) : 0
      resolve({ code, stdout, stderr })
    })
  })
}
