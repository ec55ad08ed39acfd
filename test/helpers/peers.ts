// Peer tools: the real programs (skopeo, umoci, docker-registry, buildah, htpasswd) that the
// interop tests run against. A suite that needs one asks `peer(name)` and skips itself when it
// is missing; with BLOBCACHE_REQUIRE_PEERS=1 (set by .ci/run) a missing tool fails the suite
// instead. Every answer is recorded so that global-setup.ts can say on the last lines of the run
// which tools were missing and which suites were skipped for it.
import { accessSync, appendFileSync, constants, statSync } from 'node:fs'
import { delimiter, isAbsolute, join } from 'node:path'

/** The peer tools the test suites know about, in the order they are reported. */
export const PEER_TOOLS = ['skopeo', 'umoci', 'docker-registry', 'buildah', 'htpasswd'] as const

/** Environment variable naming the file that records peer look-ups (set by global setup). */
export const PEER_RECORD_ENV = 'BLOBCACHE_PEER_RECORD'

const cache = new Map<string, string | undefined>()

/** Searches PATH for an executable file called `name`; returns its absolute path or undefined. */
export function which(name: string, path = process.env.PATH ?? ''): string | undefined {
  for (const dir of path.split(delimiter)) {
    if (!dir || !isAbsolute(dir)) continue
    const file = join(dir, name)
    try {
      if (!statSync(file).isFile()) continue
      accessSync(file, constants.X_OK)
      return file
    } catch {
      // not here; keep looking
    }
  }
  return undefined
}

/** True when the run demands every peer tool (`BLOBCACHE_REQUIRE_PEERS=1`, as in CI). */
export function peersRequired(): boolean {
  return process.env.BLOBCACHE_REQUIRE_PEERS === '1'
}

/**
 * Returns the absolute path of the peer tool `name` on PATH, or undefined when it is missing.
 * When `BLOBCACHE_REQUIRE_PEERS=1` a missing tool MUST fail the calling suite, so this throws an
 * Error naming the tool. Every call is recorded for the end-of-run report.
 */
export function peer(name: string): string | undefined {
  if (!cache.has(name)) cache.set(name, which(name))
  const found = cache.get(name)
  record(name, found)
  if (!found && peersRequired()) {
    throw new Error(
      `peer tool missing: ${name} is not on PATH, and BLOBCACHE_REQUIRE_PEERS=1 forbids skipping ` +
        `the suites that need it (install it, e.g. with .ci/run)`,
    )
  }
  return found
}

function record(name: string, found: string | undefined): void {
  const file = process.env[PEER_RECORD_ENV]
  if (!file) return
  try {
    appendFileSync(file, JSON.stringify({ name, found: found ?? null, suite: callingTestFile() }) + '\n')
  } catch {
    // the report is a courtesy; never fail a test over it
  }
}

/** The test file that asked, read from the call stack (its path relative to the working dir). */
function callingTestFile(): string {
  const stack = new Error().stack ?? ''
  const m = /(?:file:\/\/)?(\/[^\s():]+\.test\.[cm]?[jt]s)/.exec(stack)
  if (!m) return ''
  const cwd = process.cwd() + '/'
  return m[1].startsWith(cwd) ? m[1].slice(cwd.length) : m[1]
}
