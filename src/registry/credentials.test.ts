import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { authFilePaths, findCredentials, normalizeAuthKey } from './credentials.js'

async function home(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-creds-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

const b64 = (s: string) => Buffer.from(s).toString('base64')

async function write(file: string, doc: unknown): Promise<string> {
  await mkdir(join(file, '..'), { recursive: true })
  await writeFile(file, typeof doc === 'string' ? doc : JSON.stringify(doc))
  return file
}

/** Writes an executable `docker-credential-<name>` answering `answer` for `host`. */
async function helper(bin: string, name: string, host: string, answer: object | string, exit = 0): Promise<void> {
  await mkdir(bin, { recursive: true })
  const out = typeof answer === 'string' ? answer : JSON.stringify(answer)
  const file = join(bin, `docker-credential-${name}`)
  await writeFile(file, `#!/bin/sh\nread server\nif [ "$1" = get ] && [ "$server" = "${host}" ]; then echo '${out}'; exit ${exit}; fi\necho 'credentials not found in native keychain'; exit 1\n`)
  await chmod(file, 0o755)
}

describe('auth files', () => {
  it('consults an explicit file alone, else the usual places in order', async () => {
    const h = await home()
    expect(authFilePaths({ authFile: '/x/auth.json', env: { HOME: h } }).map((p) => p.path)).toEqual(['/x/auth.json'])
    expect(authFilePaths({ env: { HOME: h, REGISTRY_AUTH_FILE: '/y.json' } }).map((p) => p.path)).toEqual(['/y.json'])
    expect(authFilePaths({ env: { HOME: h, XDG_RUNTIME_DIR: '/run/user/7', DOCKER_CONFIG: '/dc' } })).toEqual([
      { path: '/run/user/7/containers/auth.json', legacy: false },
      { path: join(h, '.config/containers/auth.json'), legacy: false },
      { path: '/dc/config.json', legacy: false },
      { path: join(h, '.dockercfg'), legacy: true },
    ])
  })

  it('normalises keys like docker and containers/image', () => {
    expect(normalizeAuthKey('https://index.docker.io/v1/')).toBe('docker.io')
    expect(normalizeAuthKey('registry-1.docker.io')).toBe('docker.io')
    expect(normalizeAuthKey('http://quay.io')).toBe('quay.io')
    expect(normalizeAuthKey('quay.io/org/repo/')).toBe('quay.io/org/repo')
    expect(normalizeAuthKey('localhost:5000')).toBe('localhost:5000')
  })

  it('prefers options, then the first file with an entry, the most specific key first', async () => {
    const h = await home()
    const env = { HOME: h, XDG_RUNTIME_DIR: join(h, 'run') }
    await write(join(h, 'run/containers/auth.json'), { auths: { 'quay.io/team': { auth: b64('team:pw1') }, 'quay.io': { auth: b64('any:pw2') } } })
    await write(join(h, '.docker/config.json'), { auths: { 'quay.io': { auth: b64('docker:pw3') }, 'https://index.docker.io/v1/': { auth: b64('hub:pw4') } } })
    expect(await findCredentials('quay.io', 'team/app', { env })).toEqual({ username: 'team', password: 'pw1' })
    expect(await findCredentials('quay.io', 'other/app', { env })).toEqual({ username: 'any', password: 'pw2' })
    expect(await findCredentials('docker.io', 'library/alpine', { env })).toEqual({ username: 'hub', password: 'pw4' })
    expect(await findCredentials('ghcr.io', 'x/y', { env })).toBeUndefined()
    expect(await findCredentials('quay.io', 'team/app', { env, credentials: { username: 'o', password: 'p' } })).toEqual({ username: 'o', password: 'p' })
    const only = await write(join(h, 'only.json'), { auths: { 'ghcr.io': { auth: b64('me:tok:en') } } })
    expect(await findCredentials('ghcr.io', undefined, { env: { ...env, REGISTRY_AUTH_FILE: only } })).toEqual({ username: 'me', password: 'tok:en' })
    expect(await findCredentials('quay.io', undefined, { env, authFile: only })).toBeUndefined()
  })

  it('reads identity tokens and the legacy ~/.dockercfg', async () => {
    const h = await home()
    await write(join(h, '.docker/config.json'), { auths: { 'reg.example': { identitytoken: 'refresh' } } })
    await write(join(h, '.dockercfg'), { 'https://old.example/v1/': { auth: b64('old:pw') } })
    const env = { HOME: h, XDG_RUNTIME_DIR: join(h, 'run') }
    expect(await findCredentials('reg.example', undefined, { env })).toEqual({ identityToken: 'refresh' })
    expect(await findCredentials('old.example', undefined, { env })).toEqual({ username: 'old', password: 'pw' })
  })

  it('runs credHelpers before auths, and credsStore after them', async () => {
    const h = await home()
    const bin = join(h, 'bin')
    const env = { HOME: h, XDG_RUNTIME_DIR: join(h, 'run'), PATH: `${bin}:/usr/bin:/bin` }
    await helper(bin, 'pass', 'reg.example', { ServerURL: 'reg.example', Username: 'helped', Secret: 's1' })
    await helper(bin, 'store', 'stored.example', { ServerURL: 'stored.example', Username: '<token>', Secret: 'idtok' })
    await helper(bin, 'hub', 'https://index.docker.io/v1/', { Username: 'hubuser', Secret: 'hubpw' })
    const config = join(h, '.docker/config.json')
    await write(config, {
      credHelpers: { 'reg.example': 'pass', 'docker.io': 'hub', 'gone.example': 'not-installed' },
      auths: { 'reg.example': { auth: b64('file:pw') }, 'stored.example': {}, 'plain.example': { auth: b64('plain:pw') } },
      credsStore: 'store',
    })
    expect(await findCredentials('reg.example', undefined, { env })).toEqual({ username: 'helped', password: 's1' })
    expect(await findCredentials('stored.example', undefined, { env })).toEqual({ identityToken: 'idtok' })
    expect(await findCredentials('plain.example', undefined, { env })).toEqual({ username: 'plain', password: 'pw' })
    expect(await findCredentials('docker.io', 'library/x', { env })).toEqual({ username: 'hubuser', password: 'hubpw' })
    expect(await findCredentials('gone.example', undefined, { env })).toBeUndefined()
    expect(await findCredentials('nowhere.example', undefined, { env })).toBeUndefined()
  })

  it('gives a helper back the NODE_EXTRA_CA_CERTS that bin/blobcache moved aside', async () => {
    const h = await home()
    const bin = join(h, 'bin')
    await mkdir(bin, { recursive: true })
    const file = join(bin, 'docker-credential-env')
    await writeFile(file, '#!/bin/sh\nread server\necho "{\\"Username\\":\\"${NODE_EXTRA_CA_CERTS:-none}\\",\\"Secret\\":\\"${BLOBCACHE_EXTRA_CA_CERTS:-none}\\"}"\n')
    await chmod(file, 0o755)
    await write(join(h, '.docker/config.json'), { credHelpers: { 'reg.example': 'env' } })
    const base = { HOME: h, XDG_RUNTIME_DIR: join(h, 'run'), PATH: `${bin}:/usr/bin:/bin` }
    expect(await findCredentials('reg.example', undefined, { env: { ...base, BLOBCACHE_EXTRA_CA_CERTS: '/etc/extra.pem' } })).toEqual({
      username: '/etc/extra.pem',
      password: 'none',
    })
    expect(await findCredentials('reg.example', undefined, { env: base })).toEqual({ username: 'none', password: 'none' })
  })

  it('fails UNAUTHORIZED for a malformed file or a failing helper', async () => {
    const h = await home()
    const bin = join(h, 'bin')
    const env = { HOME: h, XDG_RUNTIME_DIR: join(h, 'run'), PATH: `${bin}:/usr/bin:/bin` }
    const bad = await write(join(h, 'bad.json'), '{not json')
    await expect(findCredentials('r', undefined, { env, authFile: bad })).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
    const badAuth = await write(join(h, 'bad-auth.json'), { auths: { r: { auth: b64('no-colon') } } })
    await expect(findCredentials('r', undefined, { env, authFile: badAuth })).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
    await helper(bin, 'broken', 'r', 'keychain locked', 3)
    const broken = await write(join(h, 'broken.json'), { credHelpers: { r: 'broken' } })
    await expect(findCredentials('r', undefined, { env, authFile: broken })).rejects.toMatchObject({ code: 'UNAUTHORIZED', message: expect.stringContaining('keychain locked') })
    const evil = await write(join(h, 'evil.json'), { credHelpers: { r: '../../bin/sh' } })
    await expect(findCredentials('r', undefined, { env, authFile: evil })).rejects.toMatchObject({ code: 'UNAUTHORIZED' })
    expect(await findCredentials('r', undefined, { env, authFile: join(h, 'missing.json') })).toBeUndefined()
  })
})
