// The shared cache tier's format and API (issue 7, items 1, 4 and 6):
// - the library API (`new BlobCache(ref, dir, mode, { shared, sharedOptions })`, copyImage,
//   `flush()`) leaves in the tier one artifact manifest per blob, tagged `sha256-<hex>`, exactly
//   as the README documents (read back with plain HTTP GETs, not through the library);
// - notes from two writers (gzip and zstd variants of one layer) are merged, not lost;
// - interop: the two-machine scenario against a second distribution instance configured
//   differently (HTTPS with a self-signed certificate and htpasswd basic auth), with
//   `--shared-creds`, `--shared-authfile` and `--shared-tls-verify=false`.
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { formatEntryManifest, parseEntryManifest } from '../../src/blobcache/shared/format.js'
import { copyImage } from '../../src/copy.js'
import { type Digest, digestHex, digestOf } from '../../src/digest.js'
import { parseImageName } from '../../src/transports/index.js'
import { cli } from '../helpers/cli.js'
import { testDir } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import {
  BLOBS_GONE,
  OCI_MANIFEST,
  type TierEntry,
  blobRequests,
  cliBuilt,
  expectSuccess,
  httpRequest,
  readLayout,
  runMachine,
  sharedStatsOf,
  tierEntry,
  warningLines,
} from '../helpers/shared-tier.js'

const EMPTY = { mediaType: 'application/vnd.oci.empty.v1+json', digest: 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a', size: 2, data: 'e30=' }

/** Checks the parts of an entry manifest every entry shares, as the README documents them. */
function expectEntryShape(entry: TierEntry | undefined, digest: Digest, size: number): asserts entry is TierEntry {
  expect(entry, `no entry for ${digest}`).toBeDefined()
  const j = entry!.json
  expect(Object.keys(j)).toEqual(['schemaVersion', 'mediaType', 'artifactType', 'config', 'layers', 'annotations'])
  expect(j.schemaVersion).toBe(2)
  expect(j.mediaType).toBe(OCI_MANIFEST)
  expect(j.artifactType).toBe('application/vnd.blobcache.entry.v1')
  expect(j.config).toEqual(EMPTY)
  expect(j.layers).toEqual([{ mediaType: 'application/vnd.blobcache.blob.v1', digest, size }])
  const keys = Object.keys(j.annotations ?? {})
  expect(keys).toEqual([...keys].sort())
  // deterministic bytes: what the library's formatter makes of the parse is the same bytes
  expect(formatEntryManifest(parseEntryManifest(entry!.bytes, digest)).equals(entry!.bytes)).toBe(true)
}

describe.skipIf(!peer('docker-registry'))('shared cache tier: the format written through the library API', () => {
  let tier: TestRegistry
  beforeAll(async () => {
    tier = await startRegistry()
  })
  afterAll(async () => {
    await tier?.stop()
  })

  it('copyImage into a BlobCache with a shared tier, then flush(): one tagged artifact manifest per blob, with its notes', async () => {
    const root = await testDir()
    const image = await writeRandomImage(parseImageName(`oci:${root}/src:v1`), { layers: 2, layerSize: 64 << 10, compression: 'gzip', seed: 601 })
    const repo = 'lib/format'
    const cache = new BlobCache(parseImageName(`oci:${root}/dest:v1`), join(root, 'cache'), 'preserve', {
      shared: `docker://${tier.host}/${repo}`,
      sharedOptions: { registry: { tlsVerify: false } },
    })
    await mkdir(join(root, 'cache'))
    await copyImage(parseImageName(`oci:${root}/src:v1`), cache)
    const stats = await cache.flush()
    expect(stats).toMatchObject({ failed: 0, dropped: 0, pending: 0, errors: 0, warnings: 0 })
    // layers, their decompressed forms, the config and the manifest
    const expected = new Set<Digest>([...image.layers.flatMap((l) => [l.digest, l.diffID]), image.configDigest, image.manifestDigest])
    expect(stats.uploaded).toBe(expected.size)
    expect(cache.stats.shared).toMatchObject({ uploaded: expected.size })

    // the tags are exactly those of the blobs, sha256-<hex>
    const tags = await httpRequest(tier.host, `/v2/${repo}/tags/list`)
    expect(tags.status).toBe(200)
    expect((JSON.parse(tags.body.toString('utf8')) as { tags: string[] }).tags.sort()).toEqual([...expected].map((d) => `sha256-${digestHex(d)}`).sort())

    for (const l of image.layers) {
      const gz = await tierEntry(tier.host, repo, l.digest)
      expectEntryShape(gz, l.digest, l.size)
      expect(gz.json.annotations).toEqual({
        'dev.blobcache.compression': 'gzip',
        'dev.blobcache.decompressed': l.diffID,
        'dev.blobcache.kind': 'layer',
      })
      const plain = await tierEntry(tier.host, repo, l.diffID)
      expectEntryShape(plain, l.diffID, plain!.json.layers[0].size)
      expect(plain.json.annotations).toEqual({ 'dev.blobcache.compressed': `${l.digest} gzip`, 'dev.blobcache.kind': 'layer' })
      // the blob itself is there, and is what it says
      const blob = await httpRequest(tier.host, `/v2/${repo}/blobs/${l.diffID}`)
      expect(blob.status).toBe(200)
      expect(digestOf(blob.body)).toBe(l.diffID)
      expect(blob.body.length).toBe(plain.json.layers[0].size)
    }
    const config = await tierEntry(tier.host, repo, image.configDigest)
    expectEntryShape(config, image.configDigest, image.config.length)
    expect(config.json.annotations).toEqual({ 'dev.blobcache.kind': 'config' })
    const manifest = await tierEntry(tier.host, repo, image.manifestDigest)
    expectEntryShape(manifest, image.manifestDigest, image.manifest.length)
    expect(manifest.json.annotations).toEqual({ 'dev.blobcache.kind': 'manifest' })
    // the empty config every entry names is stored
    const empty = await httpRequest(tier.host, `/v2/${repo}/blobs/${EMPTY.digest}`)
    expect(empty.status).toBe(200)
    expect(empty.body.toString()).toBe('{}')

    // a second flush has nothing left to do, and a second copy through a fresh cache uploads nothing new
    expect(await cache.flush()).toMatchObject({ pending: 0, uploaded: expected.size })
    const again = new BlobCache(parseImageName(`oci:${root}/dest2:v1`), join(root, 'cache'), 'preserve', {
      shared: `docker://${tier.host}/${repo}`,
      sharedOptions: { registry: { tlsVerify: false } },
    })
    await copyImage(parseImageName(`oci:${root}/src:v1`), again)
    const second = await again.flush()
    expect(second).toMatchObject({ uploaded: 0, failed: 0 })
    // the layers, config and manifest it reused were enqueued again, and found already there
    expect(second.skipped).toBeGreaterThanOrEqual(image.layers.length + 2)
  })

  it('notes from two writers (a gzip and a zstd variant of one layer) are merged, never lost', async () => {
    const root = await testDir()
    const src = parseImageName(`oci:${root}/src:v1`)
    const image = await writeRandomImage(src, { layers: 1, layerSize: 64 << 10, compression: null, seed: 602 })
    const repo = 'lib/merge'
    const writer = (name: string, alg: 'gzip' | 'zstd') =>
      new BlobCache(parseImageName(`oci:${root}/${name}:v1`), join(root, name), 'compress', {
        compressAlgorithm: alg,
        shared: `docker://${tier.host}/${repo}`,
        sharedOptions: { registry: { tlsVerify: false } },
      })
    await Promise.all([mkdir(join(root, 'gz')), mkdir(join(root, 'zs'))])
    const [gz, zs] = [writer('gz', 'gzip'), writer('zs', 'zstd')]
    await Promise.all([copyImage(src, gz), copyImage(src, zs)])
    const [a, b] = await Promise.all([gz.flush(), zs.flush()])
    expect(a.failed + b.failed).toBe(0)

    const U = image.layers[0].diffID
    const variantOf = async (dir: string) => (await readFile(join(root, dir, `${U}.compressed`), 'utf8')).trim().split(/\s/)[0] as Digest
    const [G, Z] = await Promise.all([variantOf('gz'), variantOf('zs')])
    const entry = await tierEntry(tier.host, repo, U)
    expectEntryShape(entry, U, image.layers[0].size)
    expect(entry.json.annotations?.['dev.blobcache.compressed']).toBe([`${G} gzip`, `${Z} zstd`].sort().join('\n'))
    for (const [d, alg] of [[G, 'gzip'], [Z, 'zstd']] as const) {
      const v = await tierEntry(tier.host, repo, d)
      expect(v?.json.annotations).toEqual({ 'dev.blobcache.compression': alg, 'dev.blobcache.decompressed': U, 'dev.blobcache.kind': 'layer' })
    }
  })

  it.skipIf(!cliBuilt())('the CLI flushes before exiting, with one progress line on stderr (not a terminal) and a summary line', async () => {
    const root = await testDir()
    const image = await writeRandomImage(parseImageName(`oci:${root}/src:v1`), { layers: 2, layerSize: 32 << 10, seed: 603 })
    const tierName = `docker://${tier.host}/cli/progress`
    const exit = await runMachine(['copy', '--blob-cache', join(root, 'cache'), '--shared-cache', tierName, '--shared-tls-verify=false', `oci:${root}/src:v1`, `oci:${root}/out:v1`])
    expectSuccess(exit)
    // two layers, their decompressed forms, the config and the manifest
    const blobs = 2 * image.layers.length + 2
    const progress = exit.stderr.split('\n').filter((l) => l.startsWith('shared cache:'))
    expect(progress).toEqual([expect.stringMatching(new RegExp(`^shared cache: ${blobs} of ${blobs} blobs pushed \\(.+\\)$`))])
    expect(warningLines(exit.stderr)).toEqual([])
    expect(exit.stdout).toContain(`Shared cache ${tierName}:`)
    // flushed: every entry is in the tier once the process has exited
    for (const d of [...image.layers.flatMap((l) => [l.digest, l.diffID]), image.configDigest, image.manifestDigest]) {
      expect(await tierEntry(tier.host, 'cli/progress', d), d).toBeDefined()
    }
  })
})

describe('shared cache tier: names and flags', () => {
  it('a malformed shared name is REFERENCE_INVALID (library) and a usage error, exit 2 (CLI)', async () => {
    const ref = parseImageName('oci:/nonexistent/x:v1')
    for (const bad of ['docker://127.0.0.1:5000/repo:tag', 'docker://127.0.0.1:5000/repo@sha256:' + '0'.repeat(64), 'docker://', 'oci:/x']) {
      expect(() => new BlobCache(ref, '/nonexistent', 'preserve', { shared: bad }), bad).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    }
    const usage = async (args: string[]) => (await cli(['copy', ...args, 'oci:/nonexistent/a:v1', 'oci:/nonexistent/b:v1'])).code
    expect(await usage(['--shared-cache', 'docker://127.0.0.1:5000/cache'])).toBe(2) // needs --blob-cache
    expect(await usage(['--blob-cache', '/nonexistent/c', '--shared-cache', 'docker://127.0.0.1:5000/cache:tag'])).toBe(2)
    expect(await usage(['--blob-cache', '/nonexistent/c', '--shared-creds', 'a:b'])).toBe(2) // needs --shared-cache
  })
})

describe.skipIf(!peer('docker-registry') || !peer('htpasswd') || !cliBuilt())('shared cache tier: interop with a second distribution instance', () => {
  let origin: TestRegistry
  let proxy: FaultProxy
  let tier: TestRegistry

  beforeAll(async () => {
    ;[origin, tier] = await Promise.all([startRegistry(), startRegistry({ tls: true, auth: 'htpasswd', users: { bob: 'builder' } })])
    proxy = await startFaultProxy(origin.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await Promise.all([origin?.stop(), tier?.stop()])
  })

  it('two machines share a tier on an HTTPS registry with basic auth (--shared-creds, --shared-authfile, --shared-tls-verify=false)', async () => {
    const root = await testDir()
    const image = await writeRandomImage(registryRef(origin.host, 'interop/app:v1'), { layers: 3, layerSize: 128 << 10, seed: 501 })
    const tierName = `docker://${tier.host}/cache/interop`
    const copy = (cache: string, out: string, auth: string[]) =>
      runMachine([
        'copy', '--json', '--src-tls-verify=false', '--blob-cache', cache, '--shared-cache', tierName, '--shared-tls-verify=false', ...auth,
        `docker://${proxy.host}/interop/app:v1`, `oci:${out}:v1`,
      ])
    const first = await copy(join(root, 'A'), join(root, 'out1'), ['--shared-creds', 'bob:builder'])
    expectSuccess(first)
    expect(warningLines(first.stderr)).toEqual([])
    expect(sharedStatsOf(first).uploaded).toBeGreaterThanOrEqual(image.layers.length + 1)
    // over HTTPS, with credentials: the entries are there
    const tls = { tls: true, auth: { username: 'bob', password: 'builder' } }
    for (const l of image.layers) {
      const e = await tierEntry(tier.host, 'cache/interop', l.digest, tls)
      expect(e?.json.annotations?.['dev.blobcache.decompressed']).toBe(l.diffID)
    }
    expect((await httpRequest(tier.host, '/v2/', { tls: true })).status).toBe(401)

    proxy.setRules([BLOBS_GONE])
    proxy.clear()
    const authfile = join(root, 'auth.json')
    await writeFile(authfile, JSON.stringify({ auths: { [tier.host]: { auth: Buffer.from('bob:builder').toString('base64') } } }))
    const second = await copy(join(root, 'B'), join(root, 'out2'), ['--shared-authfile', authfile])
    expectSuccess(second)
    expect(blobRequests(proxy)).toEqual([])
    expect(warningLines(second.stderr)).toEqual([])
    const [one, two] = await Promise.all([readLayout(join(root, 'out1')), readLayout(join(root, 'out2'))])
    expect(two.manifestDigest).toBe(image.manifestDigest)
    expect(one.manifestDigest).toBe(image.manifestDigest)
    for (const [d, bytes] of image.blobs) expect(two.blobs.get(d)?.equals(bytes)).toBe(true)
    expect(sharedStatsOf(second).hits).toBeGreaterThanOrEqual(image.layers.length + 1)
  })
})
