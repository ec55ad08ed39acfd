// docker:// against the real registry behind htpasswd basic auth: credentials from options,
// auth files, REGISTRY_AUTH_FILE, docker config credHelpers/credsStore through a real
// docker-credential-* program, and a blob redirect to another host that MUST NOT receive the
// Authorization header.
import { chmod, mkdir, writeFile } from 'node:fs/promises'
import { type IncomingHttpHeaders, type Server, createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Digest } from '../../src/digest.js'
import { RegistryClient } from '../../src/registry/client.js'
import { fetchManifest } from '../../src/registry/manifests.js'
import type { ImageReference, RegistryOptions } from '../../src/types.js'
import { checkImage, testDir } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

const ready = peer('docker-registry') && peer('htpasswd')

describe.skipIf(!ready)('docker:// with htpasswd basic auth', () => {
  let registry: TestRegistry
  let proxy: FaultProxy
  let image: RandomImage
  const alice = { username: 'alice', password: 'wonderland' }
  /** `docker://host/name` opened with plain HTTP allowed and `options`. */
  function at(name: string, options?: RegistryOptions): ImageReference
  function at(name: string, host: string, options?: RegistryOptions): ImageReference
  function at(name: string, a?: string | RegistryOptions, b?: RegistryOptions): ImageReference {
    const host = typeof a === 'string' ? a : registry.host
    return registryRef(host, name, { tlsVerify: false, ...(typeof a === 'string' ? b : a) })
  }

  beforeAll(async () => {
    registry = await startRegistry({ auth: 'htpasswd', users: { alice: 'wonderland', bob: 'builder' } })
    proxy = await startFaultProxy(registry.host)
    image = await writeRandomImage(at('basic/app:v1', { credentials: alice }), { layers: 2, layerSize: 3 << 19, compression: null, seed: 11 })
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
  })

  it('refuses anonymous and wrong credentials with UNAUTHORIZED naming the registry', async () => {
    const anonymous = await at('basic/app:v1').newImageSource()
    const err = await anonymous.getManifest().then(() => new Error('expected a failure'), (e: Error) => e)
    expect(err).toMatchObject({ code: 'UNAUTHORIZED', status: 401, registry: registry.host, repository: 'basic/app' })
    expect(err.message).toContain(`${registry.host}/basic/app`)
    const wrong = await at('basic/app:v1', { credentials: { username: 'alice', password: 'nope' } }).newImageSource()
    await expect(wrong.getManifest()).rejects.toMatchObject({ code: 'UNAUTHORIZED', status: 401 })
  })

  it('pushes and pulls with credentials from options', async () => {
    const src = await at('basic/app:v1', { credentials: { username: 'bob', password: 'builder' } }).newImageSource()
    await checkImage(src, image)
  })

  it('reads credentials from --authfile and from REGISTRY_AUTH_FILE', async () => {
    const dir = await testDir()
    const file = join(dir, 'auth.json')
    await writeFile(file, JSON.stringify({ auths: { [registry.host]: { auth: Buffer.from('alice:wonderland').toString('base64') } } }))
    const src = await at('basic/app:v1', { authFile: file }).newImageSource()
    expect((await src.getManifest()).bytes.equals(image.manifest)).toBe(true)
    const client = new RegistryClient(registry.host, { tlsVerify: false, env: { REGISTRY_AUTH_FILE: file, HOME: dir } })
    expect((await fetchManifest(client, 'basic/app', 'v1')).digest).toBe(image.manifestDigest)
    const none = new RegistryClient(registry.host, { tlsVerify: false, env: { HOME: dir, XDG_RUNTIME_DIR: dir } })
    await expect(fetchManifest(none, 'basic/app', 'v1')).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
  })

  it('asks docker-credential helpers named by credHelpers and credsStore in ~/.docker/config.json', async () => {
    const home = await testDir()
    const bin = join(home, 'bin')
    await mkdir(join(home, '.docker'), { recursive: true })
    await mkdir(bin)
    const log = join(home, 'asked')
    const helper = (user: string, password: string) =>
      `#!/bin/sh\nread server\necho "$0 $1 $server" >> ${log}\n` +
      `if [ "$server" = "${registry.host}" ]; then echo '{"ServerURL":"${registry.host}","Username":"${user}","Secret":"${password}"}'; ` +
      `else echo 'credentials not found in native keychain'; exit 1; fi\n`
    await writeFile(join(bin, 'docker-credential-testpass'), helper('alice', 'wonderland'))
    await writeFile(join(bin, 'docker-credential-teststore'), helper('bob', 'builder'))
    await chmod(join(bin, 'docker-credential-testpass'), 0o755)
    await chmod(join(bin, 'docker-credential-teststore'), 0o755)
    const env = { HOME: home, XDG_RUNTIME_DIR: home, PATH: `${bin}:${process.env.PATH}` }
    const config = join(home, '.docker', 'config.json')

    await writeFile(config, JSON.stringify({ credHelpers: { [registry.host]: 'testpass' } }))
    const viaHelper = new RegistryClient(registry.host, { tlsVerify: false, env })
    expect((await fetchManifest(viaHelper, 'basic/app', 'v1')).digest).toBe(image.manifestDigest)

    await writeFile(config, JSON.stringify({ auths: { [registry.host]: {} }, credsStore: 'teststore' }))
    const viaStore = new RegistryClient(registry.host, { tlsVerify: false, env })
    expect((await fetchManifest(viaStore, 'basic/app', 'v1')).digest).toBe(image.manifestDigest)
    const { readFile } = await import('node:fs/promises')
    expect((await readFile(log, 'utf8')).trim().split('\n').map((l) => l.replace(/^.*docker-credential-/, ''))).toEqual([
      `testpass get ${registry.host}`,
      `teststore get ${registry.host}`,
    ])
  })

  it('follows a blob redirect to another host without sending it the Authorization header', async () => {
    const seen: IncomingHttpHeaders[] = []
    const blobs = image.blobs
    const server: Server = createServer((req, res) => {
      seen.push(req.headers)
      const blob = blobs.get(decodeURIComponent(req.url!.slice('/cdn/'.length)) as Digest)
      if (!blob) return void res.writeHead(404).end()
      res.writeHead(200, { 'content-length': blob.length }).end(blob)
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const cdn = `localhost:${(server.address() as AddressInfo).port}`
    proxy.setRules([{ method: 'GET', path: /\/blobs\/sha256:/, fault: { kind: 'redirect', location: (p) => `http://${cdn}/cdn/${p.split('/blobs/')[1]}` } }])
    proxy.clear()
    try {
      const src = await at('basic/app:v1', proxy.host, { credentials: alice }).newImageSource()
      await checkImage(src, image)
      // the layers (1.5 MiB) are read directly, the config through Node's client: both redirect
      expect(image.layers.every((l) => l.size >= 1 << 20)).toBe(true)
      const redirected = proxy.requests.filter((r) => r.status === 307)
      expect(redirected.length).toBeGreaterThanOrEqual(image.layers.length + 1)
      expect(redirected.every((r) => r.headers.authorization?.startsWith('Basic '))).toBe(true)
      expect(seen.length).toBe(redirected.length)
      expect(seen.every((h) => h.authorization === undefined)).toBe(true)
    } finally {
      proxy.setRules([])
      server.closeAllConnections()
      await new Promise((resolve) => server.close(resolve))
    }
  })
})
