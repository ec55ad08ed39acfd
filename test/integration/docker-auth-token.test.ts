// docker:// against the real registry with bearer-token auth: the registry verifies ES256 JWTs
// from the test token server. Tokens come from the WWW-Authenticate challenge (realm, service,
// scope), are cached per scope, are renewed after a 401, and a token without the needed scope
// ends in a typed DENIED error.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { RegistryClient } from '../../src/registry/client.js'
import { fetchManifest } from '../../src/registry/manifests.js'
import type { RegistryOptions } from '../../src/types.js'
import { checkImage } from '../helpers/conformance.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, buildRandomImage, putRandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

const ready = peer('docker-registry')

describe.skipIf(!ready)('docker:// with bearer-token auth', () => {
  let registry: TestRegistry
  let image: RandomImage
  const alice = { username: 'alice', password: 'wonderland' }
  const at = (name: string, options?: RegistryOptions) => registryRef(registry.host, name, { tlsVerify: false, ...options })
  const tokenRequests = (scope: string) => registry.tokenServer!.requests.filter((r) => r.scopes.includes(scope))

  beforeAll(async () => {
    registry = await startRegistry({
      auth: 'token',
      token: {
        identityTokens: { 'refresh-alice': 'alice' },
        // readonly/* may be pulled but not pushed; anonymous users get nothing
        grant: (user, repository, actions) =>
          user === undefined ? [] : repository.startsWith('readonly/') ? actions.filter((a) => a === 'pull') : actions,
      },
    })
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('pushes with one token per scope, then pulls', async () => {
    image = await writeRandomImage(at('tok/app:v1', { credentials: alice }), { layers: 3, seed: 21 })
    expect(tokenRequests('repository:tok/app:pull,push').map((r) => [r.user, r.status])).toEqual([['alice', 200]])
    const src = await at('tok/app:v1', { credentials: alice }).newImageSource()
    await checkImage(src, image)
    expect(tokenRequests('repository:tok/app:pull')).toHaveLength(1)
  })

  it('a copy that pushes asks for one destination token: its existence checks use the push scope too', async () => {
    const source = at('tok/app:v1', { credentials: alice })
    const before = registry.tokenServer!.requests.length
    await copyImage(source, at('tok/copied:v1', { credentials: alice }))
    const asked = registry.tokenServer!.requests.slice(before).map((r) => r.scopes.join(' '))
    // the source's pull token, the destination's (its manifest HEAD starts with the warm-up, so it
    // may come first), and the mount's (both repositories)
    expect(asked.slice(0, 2).sort()).toEqual(['repository:tok/app:pull', 'repository:tok/copied:pull,push'])
    expect(asked.slice(2)).toEqual(['repository:tok/copied:pull,push repository:tok/app:pull'])
  })

  it('renews a token the registry rejects (401) and carries on', async () => {
    registry.tokenServer!.expireNext(1)
    const before = tokenRequests('repository:tok/app:pull').length
    const client = new RegistryClient(registry.host, { tlsVerify: false, credentials: alice })
    expect((await fetchManifest(client, 'tok/app', 'v1')).digest).toBe(image.manifestDigest)
    expect(tokenRequests('repository:tok/app:pull').length - before).toBe(2)
  })

  it('gets tokens with an identity token (OAuth2 refresh-token grant)', async () => {
    const client = new RegistryClient(registry.host, { tlsVerify: false, credentials: { identityToken: 'refresh-alice' } })
    expect((await fetchManifest(client, 'tok/app', 'v1')).digest).toBe(image.manifestDigest)
    const last = registry.tokenServer!.requests.at(-1)!
    expect(last).toMatchObject({ method: 'POST', user: 'alice', status: 200, scopes: ['repository:tok/app:pull'] })
    const wrong = new RegistryClient(registry.host, { tlsVerify: false, credentials: { identityToken: 'stolen' } })
    await expect(fetchManifest(wrong, 'tok/app', 'v1')).rejects.toMatchObject({ code: 'UNAUTHORIZED', status: 401 })
  })

  it('fails DENIED for insufficient_scope and UNAUTHORIZED for bad credentials', async () => {
    const readonly = await at('readonly/app:v1', { credentials: alice }).newImageDestination()
    const err = await putRandomImage(readonly, await buildRandomImage({ layers: 1, seed: 3 })).catch((e: Error) => e)
    expect(err).toMatchObject({ code: 'DENIED', status: 401, registry: registry.host, repository: 'readonly/app' })
    const anonymous = await at('tok/app:v1').newImageSource()
    await expect(anonymous.getManifest()).rejects.toMatchObject({ code: 'DENIED', status: 401 })
    const wrong = await at('tok/app:v1', { credentials: { username: 'alice', password: 'x' } }).newImageSource()
    await expect(wrong.getManifest()).rejects.toMatchObject({ code: 'UNAUTHORIZED', status: 401 })
  })

  it('sends a registry token as it is (--registry-token), and anonymous access (--no-creds) looks up no credentials', async () => {
    // a token for tok/app, fetched by hand as a CI system would hand one over
    const url = new URL(registry.tokenServer!.realm)
    url.searchParams.set('service', registry.tokenServer!.service)
    url.searchParams.set('scope', 'repository:tok/app:pull')
    const res = await fetch(url, { headers: { authorization: `Basic ${Buffer.from('alice:wonderland').toString('base64')}` } })
    const { token } = (await res.json()) as { token: string }
    const before = registry.tokenServer!.requests.length
    const client = new RegistryClient(registry.host, { tlsVerify: false, registryToken: token })
    expect((await fetchManifest(client, 'tok/app', 'v1')).digest).toBe(image.manifestDigest)
    // nothing was asked of the token server
    expect(registry.tokenServer!.requests.length).toBe(before)
    // the token's scope is all it gives: another repository is refused
    await expect(fetchManifest(new RegistryClient(registry.host, { tlsVerify: false, registryToken: token }), 'tok/copied', 'v1')).rejects.toMatchObject({
      code: expect.stringMatching(/UNAUTHORIZED|DENIED/),
    })
    // anonymous: an auth file with alice's password is not read, and anonymous users get nothing
    const { mkdtemp, writeFile, rm } = await import('node:fs/promises')
    const { join } = await import('node:path')
    const { tmpdir } = await import('node:os')
    const dir = await mkdtemp(join(tmpdir(), 'blobcache-anon-'))
    try {
      const authFile = join(dir, 'auth.json')
      await writeFile(authFile, JSON.stringify({ auths: { [registry.host]: { auth: Buffer.from('alice:wonderland').toString('base64') } } }))
      expect((await fetchManifest(new RegistryClient(registry.host, { tlsVerify: false, authFile }), 'tok/app', 'v1')).digest).toBe(image.manifestDigest)
      await expect(fetchManifest(new RegistryClient(registry.host, { tlsVerify: false, authFile, anonymous: true }), 'tok/app', 'v1')).rejects.toMatchObject({
        code: expect.stringMatching(/UNAUTHORIZED|DENIED/),
      })
      expect(registry.tokenServer!.requests.at(-1)?.user).toBeUndefined()
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
