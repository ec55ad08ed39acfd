// What the registry client trusts, and which client certificate it shows, per connection kind.
//
// Extra authorities for the CLI are loaded when a TLS connection is first verified. Node reads
// NODE_EXTRA_CA_CERTS while it starts, before any JavaScript runs: it parses that file and every
// one of its own bundled roots. With Debian's ca-certificates bundle that is 40-60 ms of every
// process, most of the start-up of a short command (`node -e 0` takes 0.02 s without it,
// 0.06-0.09 s with it), whether or not the command talks TLS at all. bin/blobcache therefore
// hands the variable over as BLOBCACHE_EXTRA_CA_CERTS, and the contexts built here trust the
// same certificates: Node's bundled roots plus those of that file. A file that cannot be read is
// reported once as a warning and the bundled roots are used, as Node itself does.
//
// A registry's certificates directory (certs.ts) adds its `*.crt` authorities to those, and its
// client certificate to every connection of that registry's client, verified or not.
import { readFileSync } from 'node:fs'
import type { SecureContext } from 'node:tls'
import { ImageError } from '../errors.js'
import { requireLazily } from '../lazy-require.js'
import type { CertDirContents } from './certs.js'

/** The variable bin/blobcache moves NODE_EXTRA_CA_CERTS to. */
export const EXTRA_CA_ENV = 'BLOBCACHE_EXTRA_CA_CERTS'

/**
 * The environment for a program this one starts (a credential helper): NODE_EXTRA_CA_CERTS is
 * given back, so that a helper written for Node.js trusts what it would have trusted without
 * bin/blobcache in between.
 */
export function childEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const file = env[EXTRA_CA_ENV]
  if (!file || env.NODE_EXTRA_CA_CERTS) return env
  const { [EXTRA_CA_ENV]: _moved, ...rest } = env
  return { ...rest, NODE_EXTRA_CA_CERTS: file }
}

let extra: { pem: string | undefined } | undefined
let verifying: { value: SecureContext | undefined } | undefined
let unverified: SecureContext | undefined

function tlsModule(): typeof import('node:tls') {
  return requireLazily('node:tls') as typeof import('node:tls')
}

/** The PEM text of the file {@link EXTRA_CA_ENV} names, read once; undefined when none. */
function extraAuthorities(): string | undefined {
  if (extra) return extra.pem
  const file = process.env[EXTRA_CA_ENV]
  let pem: string | undefined
  if (file) {
    try {
      pem = readFileSync(file, 'latin1')
    } catch (err) {
      process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(err as Error).message}`)
    }
  }
  extra = { pem }
  return pem
}

/**
 * The secure context of connections that verify servers and have no certificates directory:
 * undefined (Node's own default trust) unless {@link EXTRA_CA_ENV} names a file, whose
 * certificates are then trusted besides Node's roots. Built once per process: a context with a
 * few hundred authorities takes tens of milliseconds.
 */
export function verifyingContext(): SecureContext | undefined {
  if (verifying) return verifying.value
  const pem = extraAuthorities()
  let value: SecureContext | undefined
  if (pem !== undefined) {
    const tls = tlsModule()
    try {
      value = tls.createSecureContext({ ca: [...tls.rootCertificates, pem] })
    } catch (err) {
      process.emitWarning(`Ignoring extra certs from \`${process.env[EXTRA_CA_ENV]}\`, load failed: ${(err as Error).message}`)
    }
  }
  verifying = { value }
  return value
}

/**
 * The secure context of connections that verify nothing (tlsVerify false) and have no
 * certificates directory: it trusts no authority at all, so that it does not load Node's
 * bundled roots, about 20 ms of the main thread (`addRootCerts`) that a `--tls-verify=false`
 * command would otherwise spend on its first https attempt for nothing.
 */
export function unverifiedContext(): SecureContext {
  unverified ??= tlsModule().createSecureContext({ ca: [] })
  return unverified
}

/**
 * The secure context for a registry's connections: with `verify`, the usual authorities plus
 * the directory's; without, none; either way the directory's client certificate, if any. Fails
 * `CERT_DIR_INVALID` when TLS cannot use the directory's files (not PEM, a key that does not
 * belong to its certificate, an encrypted key).
 */
export function secureContextFor(verify: boolean, certs: CertDirContents | undefined): SecureContext | undefined {
  if (!certs || (certs.authorities.length === 0 && !certs.client)) return verify ? verifyingContext() : unverifiedContext()
  const tls = tlsModule()
  const ca: string[] = []
  if (verify) {
    ca.push(...tls.rootCertificates)
    const pem = extraAuthorities()
    if (pem !== undefined) ca.push(pem)
    ca.push(...certs.authorities)
  }
  try {
    return tls.createSecureContext({ ca, cert: certs.client?.cert, key: certs.client?.key })
  } catch (err) {
    throw new ImageError('CERT_DIR_INVALID', `certificates in ${certs.dir}: ${(err as Error).message}`, { cause: err })
  }
}
