// SharedTier against the real registry (docker-registry): the write-behind path (uploads, entry
// manifests, the empty config, skips, mounts, merged notes from concurrent writers) and the read
// path (verified downloads into a local directory with their notes, shared downloads, aborts).
import { randomBytes } from 'node:crypto'
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { gzipSync } from 'node:zlib'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { type Digest, digestOf } from '../../digest.js'
import { RegistryClient } from '../../registry/client.js'
import { uploadBlob } from '../../registry/upload.js'
import { type DripProxy, startDripProxy } from '../../../test/helpers/drip-proxy.js'
import { type FaultProxy, startFaultProxy } from '../../../test/helpers/fault-proxy.js'
import { peer } from '../../../test/helpers/peers.js'
import { type TestRegistry, startRegistry } from '../../../test/helpers/registry.js'
import { ANNOTATION, ARTIFACT_TYPE, EMPTY_CONFIG, entryTag } from './format.js'
import { type SharedTierOptions, SharedTier } from './tier.js'

const hasRegistry = !!peer('docker-registry')

/** A plain HTTP request to a registry; resolves status, headers and body. */
function http(host: string, path: string, method = 'GET', headers: Record<string, string> = {}): Promise<{ status: number; headers: Record<string, unknown>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const [hostname, port] = host.split(':')
    const req = request({ hostname, port: Number(port), path, method, headers }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
    })
    req.on('error', reject)
    req.end()
  })
}

/** The entry manifest of `digest` in `host/repo`, parsed, or undefined when absent. */
async function entryOf(host: string, repo: string, digest: Digest): Promise<Record<string, any> | undefined> {
  const res = await http(host, `/v2/${repo}/manifests/${entryTag(digest)}`, 'GET', { accept: 'application/vnd.oci.image.manifest.v1+json' })
  if (res.status === 404) return undefined
  expect(res.status).toBe(200)
  return JSON.parse(res.body.toString()) as Record<string, any>
}

/** Writes `bytes` into `dir` as a cache entry; resolves its digest, size and name. */
async function cacheEntry(dir: string, bytes: Buffer, config = false): Promise<{ digest: Digest; size: number; name: string }> {
  const digest = digestOf(bytes)
  const name = config ? `${digest}.config` : digest
  await writeFile(join(dir, name), bytes)
  return { digest, size: bytes.length, name }
}

/** A layer and its gzip variant in `dir`, with both notes, as the local cache keeps them. */
async function layerPair(dir: string, size = 100_000) {
  const plain = randomBytes(size)
  const u = await cacheEntry(dir, plain)
  const c = await cacheEntry(dir, gzipSync(plain))
  await writeFile(join(dir, `${u.digest}.compressed`), c.digest) // legacy one-line form: gzip
  await writeFile(join(dir, `${c.digest}.decompressed`), u.digest)
  return { plain, u, c }
}

async function tempFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.startsWith('.tmp-'))
}

describe.skipIf(!hasRegistry)('SharedTier against docker-registry', () => {
  let registry: TestRegistry
  let proxy: FaultProxy
  let work: string
  const tiers: SharedTier[] = []
  let warnings: string[] = []
  let repoCount = 0
  let repo: string

  beforeAll(async () => {
    registry = await startRegistry()
    proxy = await startFaultProxy(registry.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
  })
  afterEach(async () => {
    await Promise.all(tiers.splice(0).map((t) => t.flush()))
    proxy.setRules([])
    proxy.clear()
    warnings = []
    await rm(work, { recursive: true, force: true })
  })

  function tier(host = registry.host, opts: SharedTierOptions = {}): SharedTier {
    const t = new SharedTier(`docker://${host}/${repo}`, { registry: { tlsVerify: false }, env: {}, onWarning: (m) => warnings.push(m), ...opts })
    tiers.push(t)
    return t
  }

  async function dir(): Promise<string> {
    return mkdtemp(join(work, 'machine-'))
  }

  beforeEach(async () => {
    work = await mkdtemp(join(tmpdir(), 'blobcache-shared-'))
    repo = `cache/t${++repoCount}`
  })

  it('parses its name and refuses names that are not a repository', () => {
    const t = new SharedTier('127.0.0.1:5000/cache/blobs')
    expect([t.registry, t.repository, t.name]).toEqual(['127.0.0.1:5000', 'cache/blobs', 'docker://127.0.0.1:5000/cache/blobs'])
    for (const bad of ['docker://127.0.0.1:5000/cache:tag', `127.0.0.1:5000/cache@${digestOf('x')}`, 'oci:/tmp/x', 'dir:/tmp/x', 'docker://Bad/Repo', '']) {
      expect(() => new SharedTier(bad), bad).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    }
  })

  it('enqueue + flush uploads each blob, its entry manifest with notes, and the empty config', async () => {
    const d = await dir()
    const { plain, u, c } = await layerPair(d)
    const cfg = await cacheEntry(d, Buffer.from('{"architecture":"amd64"}'), true)
    const t = tier()
    t.enqueue(d, u.name)
    t.enqueue(d, c.name)
    t.enqueue(d, cfg.name)
    const progress: { done: number; total: number; bytes: number }[] = []
    const stats = await t.flush({ onProgress: (p) => progress.push(p) })
    expect(stats).toMatchObject({ uploaded: 3, failed: 0, dropped: 0, pending: 0, errors: 0, warnings: 0 })
    expect(stats.bytesUploaded).toBe(u.size + c.size + cfg.size)
    expect(progress.at(-1)).toEqual({ done: 3, total: 3, bytes: stats.bytesUploaded })

    expect((await http(registry.host, `/v2/${repo}/blobs/${u.digest}`)).body.equals(plain)).toBe(true)
    expect(digestOf((await http(registry.host, `/v2/${repo}/blobs/${c.digest}`)).body)).toBe(c.digest)
    expect((await http(registry.host, `/v2/${repo}/blobs/${EMPTY_CONFIG.digest}`)).body.toString()).toBe('{}')
    const eu = await entryOf(registry.host, repo, u.digest)
    expect(eu).toMatchObject({ artifactType: ARTIFACT_TYPE, layers: [{ digest: u.digest, size: u.size }] })
    expect(eu!.annotations).toEqual({ [ANNOTATION.kind]: 'layer', [ANNOTATION.compressed]: `${c.digest} gzip` })
    const ec = await entryOf(registry.host, repo, c.digest)
    expect(ec!.annotations).toEqual({ [ANNOTATION.kind]: 'layer', [ANNOTATION.compression]: 'gzip', [ANNOTATION.decompressed]: u.digest })
    expect((await entryOf(registry.host, repo, cfg.digest))!.annotations).toEqual({ [ANNOTATION.kind]: 'config' })
  })

  it('retries: a blob upload answered 500 once and an entry PUT cut once still land, with no warning', async () => {
    const d = await dir()
    const { plain, u } = await layerPair(d)
    proxy.setRules([
      { method: 'PUT', path: /\/blobs\/uploads\//, count: 1, fault: { kind: 'status', status: 500 } },
      { method: 'PUT', path: /\/manifests\/sha256-/, count: 1, fault: { kind: 'reset' } },
    ])
    const t = tier(proxy.host)
    t.enqueue(d, u.name)
    const stats = await t.flush()
    expect(stats).toMatchObject({ uploaded: 1, failed: 0, dropped: 0, warnings: 0 })
    expect(warnings).toEqual([])
    const faulted = proxy.requests.filter((r) => r.method === 'PUT')
    expect(faulted.filter((r) => /\/blobs\/uploads\//.test(r.path)).length).toBeGreaterThanOrEqual(2)
    expect(faulted.filter((r) => /\/manifests\/sha256-/.test(r.path)).length).toBeGreaterThanOrEqual(2)
    expect((await http(registry.host, `/v2/${repo}/blobs/${u.digest}`)).body.equals(plain)).toBe(true)
    expect(await entryOf(registry.host, repo, u.digest)).toMatchObject({ layers: [{ digest: u.digest, size: u.size }] })
  })

  it('a second enqueue of a blob the tier holds uploads nothing (stats.skipped), in this process or a fresh one', async () => {
    const d = await dir()
    const { u } = await layerPair(d)
    const first = tier(proxy.host)
    first.enqueue(d, u.name)
    expect(await first.flush()).toMatchObject({ uploaded: 1 })
    proxy.clear()
    first.enqueue(d, u.name) // same notes as written: nothing to ask
    expect(await first.flush()).toMatchObject({ uploaded: 1, skipped: 1 })
    expect(proxy.requests).toEqual([])

    const fresh = tier(proxy.host)
    fresh.enqueue(d, u.name)
    expect(await fresh.flush()).toMatchObject({ uploaded: 0, skipped: 1, notesMerged: 0, failed: 0 })
    expect(proxy.requests.filter((r) => r.method !== 'GET' && r.method !== 'HEAD')).toEqual([])
    expect(proxy.requests.filter((r) => r.path.includes('/blobs/'))).toEqual([])
  })

  it('sha512 blobs are skipped (no tag can name them), and names that are not entries are not queued', async () => {
    const d = await dir()
    const t = tier(proxy.host)
    t.enqueue(d, digestOf('x', 'sha512'))
    t.enqueue(d, '../etc/passwd')
    t.enqueue(d, `${digestOf('x')}.compressed`)
    expect(await t.flush()).toMatchObject({ skipped: 1, errors: 2, uploaded: 0, pending: 0 })
    expect(proxy.requests).toEqual([])
    expect(await t.lookup(digestOf('x', 'sha512'))).toBeUndefined()
  })

  it('mounts a blob from another repository of the same registry instead of uploading it (stats.mounted)', async () => {
    const d = await dir()
    const bytes = randomBytes(50_000)
    const e = await cacheEntry(d, bytes)
    const client = new RegistryClient(registry.host, { tlsVerify: false, env: {} })
    await uploadBlob(client, 'origin/app', Readable.from([bytes]), { digest: e.digest, size: e.size })
    const t = tier(proxy.host)
    t.enqueue(d, e.name, { mountFrom: 'origin/app' })
    expect(await t.flush()).toMatchObject({ mounted: 1, uploaded: 0, failed: 0, bytesUploaded: 0 })
    expect(proxy.requests.some((r) => r.method === 'POST' && r.path.includes(`mount=${encodeURIComponent(e.digest)}`) && r.status === 201)).toBe(true)
    expect(proxy.requests.filter((r) => r.method === 'PATCH')).toEqual([])
    expect((await http(registry.host, `/v2/${repo}/blobs/${e.digest}`)).body.equals(bytes)).toBe(true)
    expect(await entryOf(registry.host, repo, e.digest)).toBeDefined()
  })

  it('merges the notes of four concurrent writers: every variant is in the entry at the end', async () => {
    // three blobs at once, each written by four machines that each know another variant of it
    const rounds = await Promise.all(
      [0, 1, 2].map(async (round) => {
        const plain = randomBytes(20_000)
        const variants = [0, 1, 2, 3].map((i) => [digestOf(`variant ${round}.${i}`), i % 2 ? 'zstd' : 'gzip'] as const)
        const writers = await Promise.all(
          variants.map(async ([variant, alg]) => {
            const d = await dir()
            const u = await cacheEntry(d, plain)
            await writeFile(join(d, `${u.digest}.compressed`), `${variant} ${alg}`)
            return { d, u, t: tier() }
          }),
        )
        return { variants, writers }
      }),
    )
    for (const { writers } of rounds) for (const w of writers) w.t.enqueue(w.d, w.u.name)
    const stats = await Promise.all(rounds.flatMap(({ writers }) => writers.map((w) => w.t.flush())))
    for (const s of stats) expect(s).toMatchObject({ failed: 0, dropped: 0 })
    expect(stats.reduce((n, s) => n + s.uploaded + s.notesMerged + s.skipped, 0)).toBe(12)
    for (const { variants, writers } of rounds) {
      const entry = await entryOf(registry.host, repo, writers[0].u.digest)
      const lines = (entry!.annotations[ANNOTATION.compressed] as string).split('\n')
      expect(lines.sort()).toEqual(variants.map(([v, alg]) => `${v} ${alg}`).sort())
    }
  })

  it('adds new notes to an entry another machine wrote (stats.notesMerged), keeping its notes', async () => {
    const plain = randomBytes(10_000)
    const [d1, d2] = [await dir(), await dir()]
    const u = await cacheEntry(d1, plain)
    await cacheEntry(d2, plain)
    const [v1, v2] = [digestOf('v1'), digestOf('v2')]
    await writeFile(join(d1, `${u.digest}.compressed`), `${v1} gzip`)
    await writeFile(join(d2, `${u.digest}.compressed`), `${v2} zstd`)
    const a = tier()
    a.enqueue(d1, u.name)
    expect(await a.flush()).toMatchObject({ uploaded: 1 })
    const b = tier()
    b.enqueue(d2, u.name)
    expect(await b.flush()).toMatchObject({ uploaded: 0, notesMerged: 1 })
    // a learns a new note later: the same process pushes again, now that its notes changed
    await writeFile(join(d1, `${u.digest}.decompressed`), digestOf('not really, but a valid digest'))
    a.enqueue(d1, u.name)
    expect(await a.flush()).toMatchObject({ uploaded: 1, notesMerged: 1 })
    const entry = await entryOf(registry.host, repo, u.digest)
    expect(entry!.annotations[ANNOTATION.compressed]).toBe([`${v1} gzip`, `${v2} zstd`].sort().join('\n'))
    expect(entry!.annotations[ANNOTATION.decompressed]).toBe(digestOf('not really, but a valid digest'))
  })

  it('fetchInto downloads a blob verified into the directory and records its notes there', async () => {
    const [d1, d2] = [await dir(), await dir()]
    const { plain, u, c } = await layerPair(d1)
    const cfgBytes = Buffer.from('{"os":"linux"}')
    const cfg = await cacheEntry(d1, cfgBytes, true)
    const writer = tier()
    for (const n of [u.name, c.name, cfg.name]) writer.enqueue(d1, n)
    await writer.flush()

    const reader = tier()
    expect(await reader.fetchInto(d2, u.digest, u.size)).toEqual({ path: join(d2, u.digest), name: u.digest, size: u.size, isConfig: false })
    expect((await readFile(join(d2, u.digest))).equals(plain)).toBe(true)
    expect(await readFile(join(d2, `${u.digest}.compressed`), 'utf8')).toBe(c.digest)
    expect(await reader.fetchInto(d2, c.digest, -1)).toMatchObject({ name: c.digest, size: c.size })
    expect(await readFile(join(d2, `${c.digest}.decompressed`), 'utf8')).toBe(u.digest)
    expect(await reader.fetchInto(d2, cfg.digest, cfg.size)).toEqual({ path: join(d2, cfg.name), name: cfg.name, size: cfg.size, isConfig: true })
    expect((await readFile(join(d2, cfg.name))).equals(cfgBytes)).toBe(true)
    expect(reader.stats).toMatchObject({ hits: 3, misses: 0, errors: 0, bytesDownloaded: u.size + c.size + cfg.size })
    expect(await tempFiles(d2)).toEqual([])
    expect(await reader.lookup(u.digest)).toMatchObject({ digest: u.digest, size: u.size, kind: 'layer' })
  })

  it('fetchInto misses on a blob the tier lacks, and on a size other than the entry\'s', async () => {
    const [d1, d2] = [await dir(), await dir()]
    const e = await cacheEntry(d1, randomBytes(1000))
    const t = tier()
    expect(await t.fetchInto(d2, e.digest, e.size)).toBeUndefined() // not pushed yet
    t.enqueue(d1, e.name)
    await t.flush()
    expect(await t.fetchInto(d2, e.digest, e.size + 1)).toBeUndefined()
    expect(await readdir(d2)).toEqual([])
    expect(t.stats).toMatchObject({ hits: 0, misses: 1, warnings: 0 }) // one blob, missed twice
  })

  it('concurrent fetchInto calls for one blob share one download', async () => {
    const [d1, d2] = [await dir(), await dir()]
    const e = await cacheEntry(d1, randomBytes(300_000))
    const writer = tier()
    writer.enqueue(d1, e.name)
    await writer.flush()
    proxy.clear()
    const reader = tier(proxy.host)
    const results = await Promise.all([0, 1, 2, 3].map(() => reader.fetchInto(d2, e.digest, e.size)))
    for (const r of results) expect(r).toMatchObject({ path: join(d2, e.digest) })
    expect(proxy.requests.filter((r) => r.method === 'GET' && r.path.endsWith(`/blobs/${e.digest}`))).toHaveLength(1)
    expect(proxy.requests.filter((r) => r.path.includes('/manifests/'))).toHaveLength(1) // the lookup is shared too
    expect(reader.stats.hits).toBe(4)
  })

  describe('aborts', () => {
    let drip: DripProxy
    beforeAll(async () => {
      drip = await startDripProxy(registry.host)
    })
    afterAll(async () => drip?.close())

    it('an abort mid-download rejects with the reason and leaves no temporary file', async () => {
      const [d1, d2] = [await dir(), await dir()]
      const e = await cacheEntry(d1, randomBytes(64 << 10))
      const writer = tier()
      writer.enqueue(d1, e.name)
      await writer.flush()
      drip.setRules([{ method: 'GET', path: /\/blobs\/sha256:/, bytes: 1024, everyMs: 20 }])
      const reader = tier(drip.host)
      const controller = new AbortController()
      const why = new Error('user gave up')
      const fetching = reader.fetchInto(d2, e.digest, e.size, controller.signal)
      const rejected = expect(fetching).rejects.toBe(why)
      // wait until the download is under way (its temporary file exists)
      for (let i = 0; i < 200 && (await tempFiles(d2)).length === 0; i++) await sleep(10)
      expect(await tempFiles(d2)).toHaveLength(1)
      controller.abort(why)
      await rejected
      expect(await readdir(d2)).toEqual([])
      await sleep(200)
      expect(await readdir(d2)).toEqual([])
      expect(reader.stats.errors).toBe(0)
      expect(warnings).toEqual([])
    })

    it('one caller giving up does not stop the download another still waits for', async () => {
      const [d1, d2] = [await dir(), await dir()]
      const e = await cacheEntry(d1, randomBytes(32 << 10))
      const writer = tier()
      writer.enqueue(d1, e.name)
      await writer.flush()
      drip.setRules([{ method: 'GET', path: /\/blobs\/sha256:/, bytes: 4096, everyMs: 20 }])
      const reader = tier(drip.host)
      const controller = new AbortController()
      const quitter = reader.fetchInto(d2, e.digest, e.size, controller.signal)
      const stayer = reader.fetchInto(d2, e.digest, e.size)
      await sleep(50)
      controller.abort(new Error('bye'))
      await expect(quitter).rejects.toThrow('bye')
      expect(await stayer).toMatchObject({ path: join(d2, e.digest) })
      expect(digestOf(await readFile(join(d2, e.digest)))).toBe(e.digest)
      expect(await tempFiles(d2)).toEqual([])
    })
  })

  it('flush with an aborted signal drops what is left and resolves', async () => {
    const d = await dir()
    const names = await Promise.all([0, 1, 2, 3, 4].map(async () => (await cacheEntry(d, randomBytes(1000))).name))
    proxy.setRules([{ path: /./, fault: { kind: 'delay', ms: 300 } }])
    const t = tier(proxy.host, { concurrency: 1 })
    for (const n of names) t.enqueue(d, n)
    const controller = new AbortController()
    setTimeout(() => controller.abort(), 100)
    const stats = await t.flush({ signal: controller.signal })
    expect(stats.pending).toBe(0)
    expect(stats.dropped).toBe(5)
    expect(stats.failed).toBe(0)
  })

  it('a full queue drops new entries, counted, with one warning', async () => {
    const d = await dir()
    const names = await Promise.all([0, 1, 2, 3, 4, 5].map(async () => (await cacheEntry(d, randomBytes(1000))).name))
    const t = tier(registry.host, { concurrency: 1, maxQueue: 2 })
    for (const n of names) t.enqueue(d, n)
    // one job runs, two wait: three dropped
    expect(t.stats).toMatchObject({ dropped: 3, pending: 3 })
    const stats = await t.flush()
    expect(stats).toMatchObject({ uploaded: 3, dropped: 3, warnings: 1 })
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toMatch(/more than 2 blobs waiting/)
  })
})
