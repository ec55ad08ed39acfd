// TLS against the real registry serving HTTPS with a self-signed certificate: verified by
// default (so the copy fails), accepted with tlsVerify false (over https, not plain http), and a
// plain-HTTP registry is never spoken to in plain HTTP unless tlsVerify is false. Certificates
// directories (containers-certs.d(5)): the registry's certificate trusted from `ca.crt`, through
// certDir, --cert-dir and the per-host place under HOME, the same directory skopeo reads; and a
// registry that requires client certificates, reached with `client.cert` and `client.key`.
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { RegistryClient } from '../../src/registry/client.js'
import { cliBuilt, cliCommand, runCommand } from '../helpers/built-cli.js'
import { checkImage, testDir } from '../helpers/conformance.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'


/** A certificates directory holding `files` (name to PEM text). */
async function certDir(root: string, name: string, files: Record<string, string>): Promise<string> {
  const dir = join(root, name)
  await mkdir(dir, { recursive: true })
  for (const [file, text] of Object.entries(files)) await writeFile(join(dir, file), text)
  return dir
}

describe.skipIf(!peer('docker-registry'))('docker:// and TLS', () => {
  let registry: TestRegistry

  beforeAll(async () => {
    registry = await startRegistry({ tls: true })
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('refuses a self-signed certificate by default, and accepts it over https with tlsVerify false', async () => {
    const strict = registryRef(registry.host, 'tls/app:v1', {})
    const err = await strict.newImageSource().then((s) => s.getManifest()).then(() => new Error('expected a failure'), (e: Error) => e)
    expect(err).toMatchObject({ code: 'REGISTRY_ERROR', status: 0, registry: registry.host })
    expect(err.message).toMatch(/pinging the registry over https from 127\.0\.0\.1:\d+: no response \(.*certificate/)
    const loose = registryRef(registry.host, 'tls/app:v1', { tlsVerify: false })
    const image = await writeRandomImage(loose, { layers: 2, seed: 31 })
    await checkImage(await loose.newImageSource(), image)
    const client = new RegistryClient(registry.host, { tlsVerify: false })
    expect((await client.base()).protocol).toBe('https:')
  })

  it('speaks plain HTTP only when tlsVerify is false', async () => {
    const plain = await startRegistry()
    try {
      const strict = new RegistryClient(plain.host, {})
      await expect(strict.base()).rejects.toMatchObject({ code: 'REGISTRY_ERROR', status: 0, message: expect.stringContaining('over https from') })
      expect((await new RegistryClient(plain.host, { tlsVerify: false }).base()).protocol).toBe('http:')
    } finally {
      await plain.stop()
    }
  })

  it('trusts the registry certificate from a certificates directory: certDir, --cert-dir and ~/.config/containers/certs.d, as skopeo does', async () => {
    const root = await testDir()
    const { readFile } = await import('node:fs/promises')
    const ca = await readFile(registry.certPath!, 'utf8')
    const dir = await certDir(root, 'certs', { 'ca.crt': ca })
    const ref = registryRef(registry.host, 'tls/certs:v1', { certDir: dir })
    const image = await writeRandomImage(ref, { layers: 2, seed: 32 })
    await checkImage(await ref.newImageSource(), image)
    // a lone key is refused before anything is sent
    const broken = await certDir(root, 'broken', { 'ca.crt': ca, 'client.key': 'KEY' })
    await expect(registryRef(registry.host, 'tls/certs:v1', { certDir: broken }).newImageSource().then((s) => s.getManifest())).rejects.toMatchObject({
      code: 'CERT_DIR_INVALID',
    })
    const remote = `docker://${registry.host}/tls/certs:v1`
    if (peer('skopeo')) {
      const theirs = await runCommand('skopeo', ['inspect', '--cert-dir', dir, remote])
      expect(theirs.code, theirs.stderr).toBe(0)
      expect(JSON.parse(theirs.stdout).Digest).toBe(image.manifestDigest)
    }
    if (cliBuilt()) {
      const [cmd, args] = cliCommand(['inspect', '--cert-dir', dir, remote])
      const flag = await runCommand(cmd, args)
      expect(flag.code, flag.stderr).toBe(0)
      expect(JSON.parse(flag.stdout).Digest).toBe(image.manifestDigest)
      // the per-host place under HOME, found without a flag
      const home = join(root, 'home')
      await certDir(join(home, '.config', 'containers', 'certs.d'), registry.host, { 'ca.crt': ca })
      const [cmd2, args2] = cliCommand(['inspect', remote])
      const found = await runCommand(cmd2, args2, { ...process.env, HOME: home })
      expect(found.code, found.stderr).toBe(0)
      expect(JSON.parse(found.stdout).Digest).toBe(image.manifestDigest)
      const none = await runCommand(cmd2, args2, { ...process.env, HOME: join(root, 'elsewhere') })
      expect(none.code).toBe(1)
      expect(none.stderr).toMatch(/certificate/)
    }
  })
})

describe.skipIf(!peer('docker-registry'))('docker:// and a registry that requires client certificates', () => {
  let registry: TestRegistry

  beforeAll(async () => {
    registry = await startRegistry({ tls: true, clientCerts: true })
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('shows NAME.cert/NAME.key from the certificates directory, verified or not; without them the registry refuses', async () => {
    const root = await testDir()
    const { readFile } = await import('node:fs/promises')
    const ca = await readFile(registry.certPath!, 'utf8')
    const full = await certDir(root, 'full', { 'ca.crt': ca, 'client.cert': registry.clientCert!, 'client.key': registry.clientKey! })
    const ref = registryRef(registry.host, 'mtls/app:v1', { certDir: full })
    const image = await writeRandomImage(ref, { layers: 2, seed: 33 })
    await checkImage(await ref.newImageSource(), image)
    // without verifying the server, the client certificate is still shown
    const clientOnly = await certDir(root, 'client-only', { 'client.cert': registry.clientCert!, 'client.key': registry.clientKey! })
    await checkImage(await registryRef(registry.host, 'mtls/app:v1', { certDir: clientOnly, tlsVerify: false }).newImageSource(), image)
    // the server trusted but no client certificate: refused, a typed error naming the registry
    const caOnly = await certDir(root, 'ca-only', { 'ca.crt': ca })
    const client = new RegistryClient(registry.host, { certDir: caOnly, retry: { attempts: 1 } })
    await expect(client.base()).rejects.toMatchObject({
      code: 'REGISTRY_ERROR',
      status: 0,
      registry: registry.host,
      message: expect.stringContaining('wants one: NAME.cert and NAME.key'),
    })
    if (peer('skopeo')) {
      // skopeo reads the same directory the same way
      const theirs = await runCommand('skopeo', ['inspect', '--cert-dir', full, `docker://${registry.host}/mtls/app:v1`])
      expect(theirs.code, theirs.stderr).toBe(0)
      expect(JSON.parse(theirs.stdout).Digest).toBe(image.manifestDigest)
    }
    if (cliBuilt()) {
      const out = join(root, 'pulled')
      const [cmd, args] = cliCommand(['copy', '-q', '--src-cert-dir', full, `docker://${registry.host}/mtls/app:v1`, `oci:${out}:v1`])
      const pulled = await runCommand(cmd, args)
      expect(pulled.code, pulled.stderr).toBe(0)
      expect(JSON.parse(await readFile(join(out, 'index.json'), 'utf8')).manifests[0].digest).toBe(image.manifestDigest)
    }
  })
})
