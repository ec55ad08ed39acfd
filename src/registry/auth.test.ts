import { describe, expect, it } from 'vitest'
import { Authenticator, type TokenFetcher, parseChallenges, repositoryScope } from './auth.js'

describe('parseChallenges', () => {
  it('parses a Bearer challenge with quoted parameters', () => {
    expect(parseChallenges('Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push"')).toEqual([
      { scheme: 'bearer', params: { realm: 'https://auth.example.com/token', service: 'registry.example.com', scope: 'repository:a/b:pull,push' } },
    ])
  })

  it('parses several challenges in one value and in several values, unquoted and escaped', () => {
    expect(parseChallenges(['Basic realm="a \\"b\\"", Bearer realm=https://x/token,error="insufficient_scope"', 'Negotiate'])).toEqual([
      { scheme: 'basic', params: { realm: 'a "b"' } },
      { scheme: 'bearer', params: { realm: 'https://x/token', error: 'insufficient_scope' } },
      { scheme: 'negotiate', params: {} },
    ])
  })

  it('ignores what it cannot read', () => {
    expect(parseChallenges(undefined)).toEqual([])
    expect(parseChallenges('')).toEqual([])
    expect(parseChallenges('=oops')).toEqual([])
  })
})

/** A token endpoint in memory that counts requests. */
function fakeRealm(expiresIn = 300) {
  const calls: { method: string; url: URL; headers: Record<string, string>; body?: string }[] = []
  const fetchToken: TokenFetcher = async (url, init) => {
    const n = calls.push({ method: init.method, url, headers: init.headers, body: init.body })
    await new Promise((r) => setTimeout(r, 5))
    return { status: 200, headers: {}, text: JSON.stringify({ token: `t${n}`, expires_in: expiresIn }) }
  }
  return { calls, fetchToken }
}

describe('Authenticator', () => {
  const pull = [repositoryScope('a/b', 'pull')]
  const push = [repositoryScope('a/b', 'pull,push')]

  it('sends nothing without a challenge, and Basic only with a user name', async () => {
    const realm = fakeRealm()
    const auth = new Authenticator({ registry: 'r', credentials: async () => ({ username: 'u', password: 'p:w' }), fetchToken: realm.fetchToken })
    expect(await auth.authorization(pull)).toBeUndefined()
    auth.setChallenge('Basic realm="r"')
    expect(await auth.authorization(pull)).toBe(`Basic ${Buffer.from('u:p:w').toString('base64')}`)
    const withToken = new Authenticator({ registry: 'r', credentials: async () => ({ identityToken: 'x' }), fetchToken: realm.fetchToken })
    withToken.setChallenge('Basic realm="r"')
    expect(await withToken.authorization(pull)).toBeUndefined()
  })

  it('fetches one token per scope set, shared by concurrent requests, and renews after invalidate', async () => {
    const realm = fakeRealm()
    let asked = 0
    const auth = new Authenticator({ registry: 'r', credentials: async () => (asked++, { username: 'u', password: 'p' }), fetchToken: realm.fetchToken })
    auth.setChallenge('Bearer realm="https://auth/token",service="svc"')
    const [a, b, c] = await Promise.all([auth.authorization(pull), auth.authorization(pull), auth.authorization(push)])
    expect(a).toBe(b)
    expect(c).not.toBe(a)
    expect(await auth.authorization([...pull].reverse())).toBe(a)
    expect(realm.calls).toHaveLength(2)
    const call = realm.calls.find((x) => x.url.searchParams.getAll('scope').join() === pull.join())!
    expect(call.url.searchParams.get('service')).toBe('svc')
    expect(call.headers.authorization).toBe(`Basic ${Buffer.from('u:p').toString('base64')}`)
    auth.invalidate(pull)
    expect(await auth.authorization(pull)).toBe('Bearer t3')
    expect(await auth.authorization(push)).toBe(c)
    expect(asked).toBe(1)
  })

  it('renews a token once it is about to expire', async () => {
    const realm = fakeRealm(0.05)
    const auth = new Authenticator({ registry: 'r', credentials: async () => undefined, fetchToken: realm.fetchToken })
    auth.setChallenge('Bearer realm="https://auth/token"')
    expect(await auth.authorization(pull)).toBe('Bearer t1')
    expect(realm.calls[0].headers.authorization).toBeUndefined()
    await new Promise((r) => setTimeout(r, 60))
    expect(await auth.authorization(pull)).toBe('Bearer t2')
  })

  it('uses the OAuth2 refresh-token grant for an identity token', async () => {
    const realm = fakeRealm()
    const auth = new Authenticator({ registry: 'r', credentials: async () => ({ identityToken: 'refresh-me' }), fetchToken: realm.fetchToken })
    auth.setChallenge('Bearer realm="https://auth/token",service="svc"')
    await auth.authorization([...pull, repositoryScope('c/d', 'pull')])
    expect(realm.calls[0].method).toBe('POST')
    expect(Object.fromEntries(new URLSearchParams(realm.calls[0].body))).toEqual({
      grant_type: 'refresh_token', refresh_token: 'refresh-me', client_id: 'blobcache', service: 'svc', scope: 'repository:a/b:pull repository:c/d:pull',
    })
  })

  it('fails UNAUTHORIZED when the token endpoint refuses, and forgets the failure', async () => {
    let status = 401
    const auth = new Authenticator({
      registry: 'reg.example',
      credentials: async () => undefined,
      fetchToken: async () => ({ status, headers: {}, text: status === 200 ? '{"access_token":"ok"}' : '{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}' }),
    })
    auth.setChallenge('Bearer realm="https://auth/token"')
    await expect(auth.authorization(pull)).rejects.toMatchObject({ code: 'UNAUTHORIZED', status: 401, registry: 'reg.example' })
    status = 200
    expect(await auth.authorization(pull)).toBe('Bearer ok')
  })

  it('rejects a Bearer challenge without a usable realm', async () => {
    const auth = new Authenticator({ registry: 'r', credentials: async () => undefined, fetchToken: fakeRealm().fetchToken })
    auth.setChallenge('Bearer service="x"')
    await expect(auth.authorization(pull)).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
    auth.setChallenge('Bearer realm="not a url"')
    await expect(auth.authorization(pull)).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
  })
})
