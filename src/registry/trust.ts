// Extra certificate authorities for the CLI, loaded when a TLS connection is first verified.
//
// Node reads NODE_EXTRA_CA_CERTS while it starts, before any JavaScript runs: it parses that
// file and every one of its own bundled roots. With Debian's ca-certificates bundle that is
// 40-60 ms of every process, most of the start-up of a short command (`node -e 0` takes 0.02 s
// without it, 0.06-0.09 s with it), whether or not the command talks TLS at all. bin/blobcache
// therefore hands the variable over as BLOBCACHE_EXTRA_CA_CERTS, and the registry client builds
// the same trust here, once, the first time it verifies a server: Node's bundled roots plus the
// certificates of that file. A file that cannot be read is reported once as a warning and the
// bundled roots are used, as Node itself does.
import { readFileSync } from 'node:fs'
import type { SecureContext } from 'node:tls'
import { requireLazily } from '../lazy-require.js'

/** The variable bin/blobcache moves NODE_EXTRA_CA_CERTS to. */
export const EXTRA_CA_ENV = 'BLOBCACHE_EXTRA_CA_CERTS'

let context: { value: SecureContext | undefined } | undefined
let unverified: SecureContext | undefined

/**
 * The secure context of connections that verify nothing (tlsVerify false): it trusts no
 * authority at all, so that it does not load Node's bundled roots, about 20 ms of the main
 * thread (`addRootCerts`) that a `--tls-verify=false` command would otherwise spend on its
 * first https attempt for nothing.
 */
export function unverifiedContext(): SecureContext {
  const tls = requireLazily('node:tls') as typeof import('node:tls')
  unverified ??= tls.createSecureContext({ ca: [] })
  return unverified
}

/**
 * The secure context that verifying connections use: undefined (Node's own default trust) unless
 * {@link EXTRA_CA_ENV} names a file, whose certificates are then trusted besides Node's roots.
 * Built once per process: a context with a few hundred authorities takes tens of milliseconds.
 */
export function verifyingContext(env: NodeJS.ProcessEnv = process.env): SecureContext | undefined {
  if (context) return context.value
  const file = env[EXTRA_CA_ENV]
  let value: SecureContext | undefined
  if (file) {
    const tls = requireLazily('node:tls') as typeof import('node:tls')
    let extra: string | undefined
    try {
      extra = readFileSync(file, 'latin1')
    } catch (err) {
      process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(err as Error).message}`)
    }
    if (extra !== undefined) {
      try {
        value = tls.createSecureContext({ ca: [...tls.rootCertificates, extra] })
      } catch (err) {
        process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(err as Error).message}`)
      }
    }
  }
  context = { value }
  return value
}
