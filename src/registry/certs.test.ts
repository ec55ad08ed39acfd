import { execFile } from 'node:child_process'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { describe, expect, it, onTestFinished } from 'vitest'
import { findCertDir, readCertDir } from './certs.js'
import { secureContextFor } from './trust.js'

async function temp(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-certs-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

async function files(dir: string, entries: Record<string, string>): Promise<string> {
  await mkdir(dir, { recursive: true })
  for (const [name, text] of Object.entries(entries)) await writeFile(join(dir, name), text)
  return dir
}

/** A fresh self-signed certificate and its key, PEM. */
async function keyPair(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const key = join(dir, `${name}.pem-key`)
  const cert = join(dir, `${name}.pem-cert`)
  await promisify(execFile)('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', `/CN=${name}`,
  ])
  const { readFile } = await import('node:fs/promises')
  return { cert: await readFile(cert, 'utf8'), key: await readFile(key, 'utf8') }
}

describe('findCertDir', () => {
  it('takes certDir as given, else the first existing of the user, containers and docker places', async () => {
    const root = await temp()
    const home = join(root, 'home')
    const system = [join(root, 'etc-containers'), join(root, 'etc-docker')]
    const opts = { env: { HOME: home }, systemDirs: system }
    expect(await findCertDir('r.example:5000', opts)).toBeUndefined()
    await mkdir(join(system[1], 'r.example:5000'), { recursive: true })
    expect(await findCertDir('r.example:5000', opts)).toBe(join(system[1], 'r.example:5000'))
    await mkdir(join(system[0], 'r.example:5000'), { recursive: true })
    expect(await findCertDir('r.example:5000', opts)).toBe(join(system[0], 'r.example:5000'))
    await mkdir(join(home, '.config', 'containers', 'certs.d', 'r.example:5000'), { recursive: true })
    expect(await findCertDir('r.example:5000', opts)).toBe(join(home, '.config', 'containers', 'certs.d', 'r.example:5000'))
    // the port is part of the name, as in containers-certs.d(5)
    expect(await findCertDir('r.example', opts)).toBeUndefined()
    // an explicit directory wins, even one that does not exist
    expect(await findCertDir('r.example:5000', { ...opts, certDir: join(root, 'mine') })).toBe(join(root, 'mine'))
    // names that would leave the directory are never looked up
    await mkdir(join(system[0], 'x'), { recursive: true })
    for (const bad of ['..', '.', '', '../x', 'a/b']) expect(await findCertDir(bad, opts)).toBeUndefined()
  })
})

describe('readCertDir', () => {
  it('collects *.crt authorities and the first NAME.cert/NAME.key pair, in name order; a missing directory is none', async () => {
    const root = await temp()
    expect(await readCertDir(join(root, 'absent'))).toBeUndefined()
    const dir = await files(join(root, 'd'), {
      'b.crt': 'CA B',
      'a.crt': 'CA A',
      'client.cert': 'CERT 1',
      'client.key': 'KEY 1',
      'other.cert': 'CERT 2',
      'other.key': 'KEY 2',
      'README': 'ignored',
      'ca.pem': 'ignored too',
    })
    await mkdir(join(dir, 'sub.crt'))
    expect(await readCertDir(dir)).toEqual({ dir, authorities: ['CA A', 'CA B'], client: { cert: 'CERT 1', key: 'KEY 1', name: 'client.cert' } })
    expect(await readCertDir(await files(join(root, 'empty'), {}))).toEqual({ dir: join(root, 'empty'), authorities: [] })
  })

  it('refuses a client certificate without its key, and a key without its certificate (CERT_DIR_INVALID)', async () => {
    const root = await temp()
    const noKey = await files(join(root, 'a'), { 'client.cert': 'C' })
    await expect(readCertDir(noKey)).rejects.toMatchObject({ code: 'CERT_DIR_INVALID', message: expect.stringMatching(/client\.cert has no key client\.key .*\.crt/) })
    const noCert = await files(join(root, 'b'), { 'client.key': 'K', 'ca.crt': 'CA' })
    await expect(readCertDir(noCert)).rejects.toMatchObject({ code: 'CERT_DIR_INVALID', message: expect.stringContaining('key client.key has no client certificate client.cert') })
  })
})

describe('secureContextFor', () => {
  it('builds a context from real PEM files; a key of another certificate, or no PEM at all, is CERT_DIR_INVALID', async () => {
    const root = await temp()
    const one = await keyPair(root, 'one')
    const two = await keyPair(root, 'two')
    const good = { dir: root, authorities: [one.cert], client: { ...one, name: 'one.cert' } }
    expect(secureContextFor(true, good)).toBeDefined()
    expect(secureContextFor(false, good)).toBeDefined()
    expect(() => secureContextFor(true, { dir: root, authorities: [], client: { cert: one.cert, key: two.key, name: 'one.cert' } })).toThrow(
      expect.objectContaining({ code: 'CERT_DIR_INVALID', message: expect.stringContaining(root) }),
    )
    expect(() => secureContextFor(false, { dir: root, authorities: [], client: { cert: 'not pem', key: 'not pem', name: 'x.cert' } })).toThrow(
      expect.objectContaining({ code: 'CERT_DIR_INVALID' }),
    )
  })
})
