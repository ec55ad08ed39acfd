// SharedTier when things go wrong, against the real registry: corrupt and wrong-size blobs in the
// tier are misses (never served, nothing named), a stopped, refusing, failing or silent registry
// costs little time and one warning per cooldown, and a registry garbage-collect run keeps every
// entry and its blob.
import { randomBytes } from 'node:crypto'
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { type Digest, digestHex, digestOf } from '../../digest.js'
import { RegistryClient } from '../../registry/client.js'
import { pushManifest } from '../../registry/manifests.js'
import { uploadBlob } from '../../registry/upload.js'
import { type FaultProxy, startFaultProxy } from '../../../test/helpers/fault-proxy.js'
import { peer } from '../../../test/helpers/peers.js'
import { type TestRegistry, startRegistry } from '../../../test/helpers/registry.js'
import { ENTRY_MANIFEST_MEDIA_TYPE, entryTag, formatEntryManifest } from './format.js'
import { type SharedTierOptions, SharedTier } from './tier.js'

const hasRegistry = !!peer('docker-registry')
const REPO = 'cache/blobs'

/** The status of a plain HTTP request. */
function status(host: string, path: string, method = 'HEAD'): Promise<number> {
  return new Promise((resolve, reject) => {
    const [hostname, port] = host.split(':')
    const req = request({ hostname, port: Number(port), path, method, headers: { accept: ENTRY_MANIFEST_MEDIA_TYPE } }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? 0))
    })
    req.on('error', reject)
    req.end()
  })
}

/** The data file of a blob in the registry's filesystem storage. */
function blobData(registry: TestRegistry, digest: Digest): string {
  const hex = digestHex(digest)
  return join(registry.dir, 'storage', 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex, 'data')
}

describe.skipIf(!hasRegistry)('SharedTier failures against docker-registry', () => {
  let work: string
  let warnings: string[]
  const cleanups: (() => Promise<void>)[] = []

  beforeEach(async () => {
    work = await mkdtemp(join(tmpdir(), 'blobcache-shared-faults-'))
    warnings = []
  })
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c()
    await rm(work, { recursive: true, force: true })
  })

  async function registryUp(opts: Parameters<typeof startRegistry>[0] = {}): Promise<TestRegistry> {
    const r = await startRegistry(opts)
    cleanups.push(() => r.stop())
    return r
  }

  async function proxyTo(r: TestRegistry): Promise<FaultProxy> {
    const p = await startFaultProxy(r.host)
    cleanups.push(() => p.close())
    return p
  }

  function tier(host: string, opts: SharedTierOptions = {}): SharedTier {
    const t = new SharedTier(`docker://${host}/${REPO}`, { registry: { tlsVerify: false }, env: {}, onWarning: (m) => warnings.push(m), ...opts })
    cleanups.push(async () => void (await t.flush()))
    return t
  }

  async function machine(): Promise<string> {
    return mkdtemp(join(work, 'machine-'))
  }

  /** Pushes `bytes` into the tier of `host` from a fresh machine; resolves the blob. */
  async function pushed(host: string, bytes: Buffer): Promise<{ digest: Digest; size: number }> {
    const d = await machine()
    const digest = digestOf(bytes)
    await writeFile(join(d, digest), bytes)
    const t = tier(host)
    t.enqueue(d, digest)
    expect(await t.flush()).toMatchObject({ uploaded: 1, failed: 0 })
    return { digest, size: bytes.length }
  }

  it('a corrupt blob in the tier (same size, other bytes) is a miss: counted, one warning, nothing named', async () => {
    const registry = await registryUp()
    const blob = await pushed(registry.host, randomBytes(200_000))
    await writeFile(blobData(registry, blob.digest), randomBytes(blob.size))
    const d = await machine()
    const t = tier(registry.host)
    expect(await t.fetchInto(d, blob.digest, blob.size)).toBeUndefined()
    expect(await readdir(d)).toEqual([])
    expect(t.stats).toMatchObject({ hits: 0, misses: 1, errors: 1, warnings: 1 })
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toContain(blob.digest)
    expect(warnings[0]).toMatch(/corrupt/)
    // this process does not try it again
    expect(await t.fetchInto(d, blob.digest, blob.size)).toBeUndefined()
    expect(t.stats).toMatchObject({ misses: 1, errors: 1, warnings: 1 }) // one blob: one miss
    // the tier is not taken for down: a good blob is still served
    const good = await pushed(registry.host, randomBytes(1000))
    expect(await t.fetchInto(d, good.digest, good.size)).toMatchObject({ name: good.digest })
  })

  it('a blob of another size than its entry says is a miss, whichever is wrong', async () => {
    const registry = await registryUp()
    const client = new RegistryClient(registry.host, { tlsVerify: false, env: {} })
    // the entry claims one byte more than the blob has
    const a = await pushed(registry.host, randomBytes(50_000))
    const lie = formatEntryManifest({ digest: a.digest, size: a.size + 1, kind: 'layer', compressed: new Map() })
    await pushManifest(client, REPO, entryTag(a.digest)!, lie, ENTRY_MANIFEST_MEDIA_TYPE)
    // the blob's data in storage was cut short
    const b = await pushed(registry.host, randomBytes(50_000))
    await writeFile(blobData(registry, b.digest), randomBytes(b.size - 100))
    const d = await machine()
    const t = tier(registry.host)
    expect(await t.fetchInto(d, a.digest, -1)).toBeUndefined()
    expect(await t.fetchInto(d, a.digest, a.size)).toBeUndefined() // the caller's size differs from the entry's
    expect(await t.fetchInto(d, b.digest, b.size)).toBeUndefined()
    expect(await readdir(d)).toEqual([])
    expect(t.stats).toMatchObject({ hits: 0, misses: 2 }) // two blobs missed (a twice)
    expect(t.stats.errors).toBeGreaterThanOrEqual(2)
    expect(warnings.filter((w) => w.includes(a.digest))).toHaveLength(1)
    expect(warnings.filter((w) => w.includes(b.digest))).toHaveLength(1)
  })

  it('a stopped registry: lookups and fetches miss at once, one warning, and flush counts the jobs failed', async () => {
    const registry = await registryUp()
    const blob = await pushed(registry.host, randomBytes(1000))
    await registry.halt()
    const d = await machine()
    await writeFile(join(d, blob.digest), randomBytes(10)) // its content does not matter: nothing is sent
    const t = tier(registry.host)
    const started = Date.now()
    const found = await Promise.all([t.lookup(blob.digest), t.fetchInto(d, blob.digest, blob.size), t.lookup(digestOf('other'))])
    expect(Date.now() - started).toBeLessThan(1000)
    for (let i = 0; i < 5; i++) expect(await t.fetchInto(d, digestOf(`more ${i}`), -1)).toBeUndefined()
    t.enqueue(d, blob.digest)
    const stats = await t.flush()
    expect(Date.now() - started).toBeLessThan(1500)
    expect(found).toEqual([undefined, undefined, undefined])
    expect(stats).toMatchObject({ hits: 0, misses: 6, uploaded: 0, failed: 1, pending: 0, warnings: 1 })
    expect(stats.errors).toBeGreaterThanOrEqual(1)
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toMatch(/unusable/)
    expect(await readdir(d)).toEqual([blob.digest])
  })

  it('refused credentials: lookups miss, one warning, pushes fail counted', async () => {
    const registry = await registryUp({ auth: 'htpasswd' })
    const d = await machine()
    const bytes = randomBytes(1000)
    const digest = digestOf(bytes)
    await writeFile(join(d, digest), bytes)
    const t = tier(registry.host, { registry: { tlsVerify: false, credentials: { username: 'alice', password: 'wrong' } } })
    const started = Date.now()
    expect(await t.lookup(digest)).toBeUndefined()
    expect(await t.fetchInto(d, digest, bytes.length)).toBeUndefined()
    t.enqueue(d, digest)
    const stats = await t.flush()
    expect(Date.now() - started).toBeLessThan(1500)
    expect(stats).toMatchObject({ uploaded: 0, failed: 1, warnings: 1 })
    expect(warnings[0]).toMatch(/unusable/)
    // with the right password the same tier works (a fresh one: the breaker is per tier)
    const ok = tier(registry.host, { registry: { tlsVerify: false, credentials: { username: 'alice', password: 'wonderland' } } })
    ok.enqueue(d, digest)
    expect(await ok.flush()).toMatchObject({ uploaded: 1, failed: 0, warnings: 0 })
    expect(await ok.fetchInto(await machine(), digest, bytes.length)).toMatchObject({ name: digest })
  })

  it('a failing registry (503) is not asked again during the cooldown, and warned about once per cooldown', async () => {
    const registry = await registryUp()
    const proxy = await proxyTo(registry)
    proxy.setRules([{ path: /\/v2\/.+/, fault: { kind: 'status', status: 503 } }])
    const t = tier(proxy.host, { cooldownMs: 400 })
    const d = await machine()
    expect(await t.lookup(digestOf('a'))).toBeUndefined()
    const asked = proxy.requests.length
    expect(asked).toBeGreaterThan(0)
    for (let i = 0; i < 10; i++) expect(await t.fetchInto(d, digestOf(`b${i}`), -1)).toBeUndefined()
    expect(proxy.requests.length).toBe(asked)
    expect(warnings).toHaveLength(1)
    await sleep(450)
    expect(await t.lookup(digestOf('c'))).toBeUndefined()
    expect(proxy.requests.length).toBeGreaterThan(asked) // asked again after the cooldown
    expect(warnings).toHaveLength(2)
    proxy.setRules([])
    await sleep(450)
    const blob = await pushed(proxy.host, randomBytes(500))
    expect(await t.fetchInto(d, blob.digest, blob.size)).toMatchObject({ name: blob.digest })
    expect(t.stats).toMatchObject({ warnings: 2, hits: 1 })
  })

  it('a registry that does not answer costs one request time limit, then the breaker holds', async () => {
    const registry = await registryUp()
    const proxy = await proxyTo(registry)
    proxy.setRules([{ path: /\/v2\//, fault: { kind: 'delay', ms: 5000 } }])
    const t = tier(proxy.host, { requestTimeoutMs: 300 })
    const d = await machine()
    const started = Date.now()
    const results = await Promise.all([0, 1, 2, 3].map((i) => t.fetchInto(d, digestOf(`x${i}`), -1)))
    expect(results).toEqual([undefined, undefined, undefined, undefined])
    expect(await t.lookup(digestOf('y'))).toBeUndefined()
    expect(Date.now() - started).toBeLessThan(1500)
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toMatch(/unusable/)
  })

  it('a registry garbage-collect run (--delete-untagged) keeps every entry, its blob and the empty config', async () => {
    const registry = await registryUp()
    const blobs = [await pushed(registry.host, randomBytes(30_000)), await pushed(registry.host, randomBytes(40_000))]
    // a control blob that nothing references: garbage-collect must delete it
    const loose = randomBytes(20_000)
    const client = new RegistryClient(registry.host, { tlsVerify: false, env: {} })
    await uploadBlob(client, REPO, Readable.from([loose]), { digest: digestOf(loose), size: loose.length })
    await registry.halt()
    await registry.garbageCollect({ deleteUntagged: true })
    await registry.restart()
    await expect(stat(blobData(registry, digestOf(loose)))).rejects.toMatchObject({ code: 'ENOENT' })
    const t = tier(registry.host)
    const d = await machine()
    for (const b of blobs) {
      expect(await status(registry.host, `/v2/${REPO}/manifests/${entryTag(b.digest)}`)).toBe(200)
      expect(await t.fetchInto(d, b.digest, b.size)).toMatchObject({ name: b.digest, size: b.size })
    }
    expect(t.stats).toMatchObject({ hits: 2, errors: 0, warnings: 0 })
    // writing to the tier after the run works (the empty config is still there)
    const later = await pushed(registry.host, randomBytes(500))
    expect(await t.fetchInto(d, later.digest, later.size)).toMatchObject({ name: later.digest })
  })
})
