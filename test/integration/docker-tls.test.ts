// TLS against the real registry serving HTTPS with a self-signed certificate: verified by
// default (so the copy fails), accepted with tlsVerify false (over https, not plain http), and a
// plain-HTTP registry is never spoken to in plain HTTP unless tlsVerify is false.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { RegistryClient } from '../../src/registry/client.js'
import { checkImage } from '../helpers/conformance.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

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
})
