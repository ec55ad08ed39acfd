// docker:// through proxies from the environment, against the real registry: a forward proxy
// (test/helpers/forward-proxy.ts) is the only way to the registry's name `registry.test`, which
// the client cannot resolve itself, so every byte that arrives went through it. Plain HTTP goes
// in absolute form (HTTP_PROXY), HTTPS through a CONNECT tunnel (HTTPS_PROXY) with TLS verified
// end to end; proxy credentials come from the proxy URL; NO_PROXY and loopback addresses bypass
// the proxy, as in skopeo, which is run through the same proxy for comparison.
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { RegistryClient } from '../../src/registry/client.js'
import { parseImageName } from '../../src/transports/index.js'
import { cliBuilt, cliCommand, runCommand } from '../helpers/built-cli.js'
import { testDir } from '../helpers/conformance.js'
import { type ForwardProxy, startForwardProxy } from '../helpers/forward-proxy.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, startRegistry } from '../helpers/registry.js'


/** The environment of a command: no proxy variables but `vars`. */
function withProxies(vars: Record<string, string>): NodeJS.ProcessEnv {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy', 'REQUEST_METHOD']) delete env[k]
  return { ...env, ...vars }
}

describe.skipIf(!peer('docker-registry') || !cliBuilt())('docker:// through a proxy', () => {
  let plain: TestRegistry
  let tls: TestRegistry
  /** Pushes `src` to `remote` (on the TLS registry) with the CLI in `env`; the push goes through `proxy`'s tunnel. */
  const pushThrough = async (proxy: ForwardProxy, env: NodeJS.ProcessEnv, certs: string, src: string, remote: string, digest: string) => {
    const [cmd, args] = cliCommand(['copy', '-q', '--json', '--dest-cert-dir', certs, src, remote])
    const pushed = await runCommand(cmd, args, env)
    expect(pushed.code, pushed.stderr).toBe(0)
    expect(JSON.parse(pushed.stdout).manifestDigest).toBe(digest)
    expect(proxy.log).toContain(`CONNECT registry.test:${tls.port}`)
  }
  /** A certificates directory under `root` trusting the TLS registry's certificate. */
  const registryCertDir = async (root: string) => {
    const certs = join(root, 'certs')
    await mkdir(certs, { recursive: true })
    await writeFile(join(certs, 'ca.crt'), await readFile(tls.certPath!, 'utf8'))
    return certs
  }
  let proxy: ForwardProxy
  let locked: ForwardProxy

  beforeAll(async () => {
    ;[plain, tls] = await Promise.all([startRegistry(), startRegistry({ tls: true })])
    const hosts = { 'registry.test': '127.0.0.1' }
    ;[proxy, locked] = await Promise.all([startForwardProxy({ hosts }), startForwardProxy({ hosts, credentials: 'squid:p@ss word' })])
  })
  afterAll(async () => {
    await Promise.all([plain?.stop(), tls?.stop(), proxy?.close(), locked?.close()])
  })

  it('plain HTTP goes through HTTP_PROXY in absolute form; NO_PROXY sends it direct', async () => {
    const root = await testDir()
    await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 2, seed: 41 })
    const remote = `docker://registry.test:${plain.port}/proxied/app:v1`
    const env = withProxies({ HTTP_PROXY: proxy.url })
    const [cmd, push] = cliCommand(['copy', '-q', '--json', '--dest-tls-verify=false', `oci:${root}/src:latest`, remote])
    const pushed = await runCommand(cmd, push, env)
    expect(pushed.code, pushed.stderr).toBe(0)
    const digest = JSON.parse(pushed.stdout).manifestDigest
    expect(proxy.log).toContain(`PUT http://registry.test:${plain.port}/v2/proxied/app/manifests/v1`)
    // the https attempt of the ping has no proxy (HTTPS_PROXY is not set) and fails to resolve
    expect(proxy.log.some((l) => l.startsWith('CONNECT'))).toBe(false)
    const [, pull] = cliCommand(['copy', '-q', '--src-tls-verify=false', remote, `oci:${root}/pulled:v1`])
    const pulled = await runCommand(cmd, pull, env)
    expect(pulled.code, pulled.stderr).toBe(0)
    expect(JSON.parse(await readFile(join(root, 'pulled', 'index.json'), 'utf8')).manifests[0].digest).toBe(digest)
    expect(proxy.log.filter((l) => l.startsWith(`GET http://registry.test:${plain.port}/v2/proxied/app/blobs/`)).length).toBeGreaterThanOrEqual(3)
    // excepted by NO_PROXY (any of its spellings), the name is looked up here, and fails
    for (const noProxy of ['registry.test', '.test', `registry.test:${plain.port}`, '*']) {
      const direct = await runCommand(cmd, ['inspect', '--tls-verify=false', remote], withProxies({ HTTP_PROXY: proxy.url, NO_PROXY: noProxy }))
      expect(direct.code, noProxy).toBe(1)
      expect(direct.stderr).toMatch(/ENOTFOUND|EAI_AGAIN|getaddrinfo/)
    }
    // NO_PROXY for another port or name does not apply
    const other = await runCommand(cmd, ['inspect', '--tls-verify=false', remote], withProxies({ http_proxy: proxy.url, no_proxy: 'registry.test:1,example.com' }))
    expect(other.code, other.stderr).toBe(0)
    // a loopback address is never proxied, even with a proxy that does not exist
    const loopback = await runCommand(cmd, ['inspect', '--tls-verify=false', `docker://127.0.0.1:${plain.port}/proxied/app:v1`], withProxies({ HTTP_PROXY: 'http://127.0.0.1:9' }))
    expect(loopback.code, loopback.stderr).toBe(0)
    expect(JSON.parse(loopback.stdout).Digest).toBe(digest)
  })

  it('HTTPS goes through a CONNECT tunnel of HTTPS_PROXY, verified end to end, with the proxy credentials of its URL', async () => {
    const root = await testDir()
    const certs = await registryCertDir(root)
    const image = await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 2, seed: 42 })
    const remote = `docker://registry.test:${tls.port}/tunnel/app:v1`
    const proxyUrl = new URL(locked.url)
    proxyUrl.username = 'squid'
    proxyUrl.password = 'p@ss word'
    const env = withProxies({ HTTPS_PROXY: proxyUrl.href })
    await pushThrough(locked, env, certs, `oci:${root}/src:latest`, remote, image.manifestDigest)
    const [cmd] = cliCommand([])
    expect(locked.log.some((l) => !l.startsWith('CONNECT'))).toBe(false)
    // the certificate is checked for the name asked for: without the CA the tunnel is not enough
    const untrusted = await runCommand(cmd, ['inspect', remote], env)
    expect(untrusted.code).toBe(1)
    expect(untrusted.stderr).toMatch(/certificate/)
    // wrong proxy credentials: the proxy's 407, a typed failure
    const refused = await runCommand(cmd, ['inspect', '--cert-dir', certs, remote], withProxies({ HTTPS_PROXY: locked.url }))
    expect(refused.code).toBe(1)
    expect(refused.stderr).toMatch(/answered HTTP 407 to CONNECT registry\.test/)
    // the library: the same through RegistryClient with an explicit environment
    const client = new RegistryClient(`registry.test:${tls.port}`, { certDir: certs, env, retry: { attempts: 1 } })
    expect((await client.base()).href).toBe(`https://registry.test:${tls.port}/`)
    if (peer('skopeo')) {
      const before = locked.log.length
      const theirs = await runCommand('skopeo', ['inspect', '--cert-dir', certs, remote], env)
      expect(theirs.code, theirs.stderr).toBe(0)
      expect(JSON.parse(theirs.stdout).Digest).toBe(image.manifestDigest)
      expect(locked.log.slice(before)).toContain(`CONNECT registry.test:${tls.port}`)
    }
  })

  it('an https:// proxy is checked with the registry client\'s TLS settings (its certificates directory), as in Go', async () => {
    const root = await testDir()
    const cert = await readFile(tls.certPath!, 'utf8')
    const secure = await startForwardProxy({ hosts: { 'registry.test': '127.0.0.1' }, tls: { cert, key: await readFile(join(tls.dir, 'tls.key'), 'utf8') } })
    try {
      const certs = await registryCertDir(root)
      const image = await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 1, seed: 43 })
      const remote = `docker://registry.test:${tls.port}/secure-proxy/app:v1`
      const env = withProxies({ HTTPS_PROXY: secure.url })
      await pushThrough(secure, env, certs, `oci:${root}/src:latest`, remote, image.manifestDigest)
      const [cmd] = cliCommand([])
      // without the directory neither the proxy's certificate nor the registry's is trusted
      const refused = await runCommand(cmd, ['inspect', remote], env)
      expect(refused.code).toBe(1)
      expect(refused.stderr).toMatch(/certificate/)
    } finally {
      await secure.close()
    }
  })

  it('refuses a proxy scheme it cannot speak with a typed error', async () => {
    const client = new RegistryClient(`registry.test:${plain.port}`, { tlsVerify: false, env: withProxies({ HTTPS_PROXY: 'socks5://127.0.0.1:1080' }) })
    await expect(client.base()).rejects.toMatchObject({ code: 'UNSUPPORTED', message: expect.stringContaining('socks5 proxies are not supported') })
  })
})
