// The shared cache tier between two "machines" (issue 7, item 6): separate CLI processes
// (dist/cli.js), each with its own local cache directory, sharing one tier repository on a real
// docker-registry. The first copies from an origin registry and flushes its cache into the tier;
// then the origin's blobs become unreachable (a proxy answering 404 to every blob request, the
// manifests still served) and the second copies the same image from the tier alone:
// - plainly (same manifest and layer bytes, no blob request reaching the origin, tier hits);
// - with notes written by the first used for substitution: `--cache-compression decompress`
//   gives the uncompressed layers, `compress` the gzip variants the first made in the background;
// - after the tier registry was stopped, garbage-collected (`--delete-untagged`) and restarted.
import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { gunzipSync } from 'node:zlib'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Digest, digestOf } from '../../src/digest.js'
import { testDir } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, randomBytesFrom, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import {
  BLOBS_GONE,
  type MachineExit,
  blobDataPath,
  blobRequests,
  cliBuilt,
  expectSuccess,
  pushOrphanBlob,
  readLayout,
  runMachine,
  sharedStatsOf,
  storedTags,
  tierEntry,
  warningLines,
} from '../helpers/shared-tier.js'

const OCI_TAR = 'application/vnd.oci.image.layer.v1.tar'
const OCI_TAR_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip'

describe.skipIf(!peer('docker-registry') || !cliBuilt())('shared cache tier: two machines', () => {
  let origin: TestRegistry
  let proxy: FaultProxy
  let tier: TestRegistry

  beforeAll(async () => {
    ;[origin, tier] = await Promise.all([startRegistry(), startRegistry()])
    proxy = await startFaultProxy(origin.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await Promise.all([origin?.stop(), tier?.stop()])
  })

  /** One machine's `copy --json` from the origin (through the proxy) into an OCI layout. */
  function copy(opts: { cache: string; tierHost?: string; repo: string; image: string; out: string; extra?: string[] }): Promise<MachineExit> {
    return runMachine([
      'copy', '--json', '--src-tls-verify=false', '--blob-cache', opts.cache,
      '--shared-cache', `docker://${opts.tierHost ?? tier.host}/${opts.repo}`, '--shared-tls-verify=false',
      ...(opts.extra ?? []),
      `docker://${proxy.host}/${opts.image}`, `oci:${opts.out}:v1`,
    ])
  }

  /** Pushes a random image to the origin, with the proxy passing everything. */
  async function originImage(name: string, opts: Parameters<typeof writeRandomImage>[1]): Promise<RandomImage> {
    proxy.setRules([])
    return writeRandomImage(registryRef(origin.host, name), opts)
  }

  /** Makes the origin's blobs unreachable and forgets the requests seen so far. */
  function cutOriginBlobs(): void {
    proxy.setRules([BLOBS_GONE])
    proxy.clear()
  }

  /** What every plain two-machine run must show for the second machine. */
  async function expectServedByTier(second: MachineExit, first: MachineExit, root: string, blobs: number): Promise<void> {
    expectSuccess(second)
    expect(blobRequests(proxy)).toEqual([]) // not one blob request reached (or even tried) the origin
    expect(second.json?.manifestDigest).toBe(first.json?.manifestDigest)
    const [one, two] = await Promise.all([readLayout(join(root, 'out1')), readLayout(join(root, 'out2'))])
    expect(two.manifestDigest).toBe(one.manifestDigest)
    expect([...two.blobs.keys()]).toEqual([...one.blobs.keys()])
    for (const [d, bytes] of one.blobs) expect(two.blobs.get(d)!.equals(bytes)).toBe(true)
    const stats = sharedStatsOf(second)
    expect(stats.hits).toBeGreaterThanOrEqual(blobs)
    expect(stats.errors).toBe(0)
    expect(stats.warnings).toBe(0)
    expect(warningLines(second.stderr)).toEqual([])
  }

  it('a second machine copies an image whose origin blobs it cannot reach, entirely from the tier', async () => {
    const root = await testDir()
    const image = await originImage('two/app:v1', { layers: 3, layerSize: 256 << 10, seed: 101 })
    const first = await copy({ cache: join(root, 'A'), repo: 'cache/two', image: 'two/app:v1', out: join(root, 'out1') })
    expectSuccess(first)
    expect(first.json?.manifestDigest).toBe(image.manifestDigest)
    expect(warningLines(first.stderr)).toEqual([])
    const pushed = sharedStatsOf(first)
    expect(pushed.failed + pushed.dropped + pushed.pending).toBe(0)
    // flushed before exit: the tier holds an entry for every blob the first machine cached
    for (const d of [image.configDigest, ...image.layers.flatMap((l) => [l.digest, l.diffID])]) {
      expect((await tierEntry(tier.host, 'cache/two', d))?.json.layers[0].digest).toBe(d)
    }

    cutOriginBlobs()
    const second = await copy({ cache: join(root, 'B'), repo: 'cache/two', image: 'two/app:v1', out: join(root, 'out2') })
    await expectServedByTier(second, first, root, image.layers.length + 1)
    // what came from the tier went into the second machine's own cache, verified
    for (const l of image.layers) expect(digestOf(await readFile(join(root, 'B', l.digest)))).toBe(l.digest)

    // and without the tier the same copy fails: the origin's blobs really are out of reach
    const without = await runMachine([
      'copy', '-q', '--src-tls-verify=false', '--blob-cache', join(root, 'C'), `docker://${proxy.host}/two/app:v1`, `oci:${root}/out3:v1`,
    ])
    expect(without.code).toBe(1)
  })

  it('notes written by one machine are used by the other for substitution (decompress)', async () => {
    const root = await testDir()
    const image = await originImage('notes/gz:v1', { layers: 2, layerSize: 128 << 10, compression: 'gzip', seed: 102 })
    const first = await copy({ cache: join(root, 'A'), repo: 'cache/notes', image: 'notes/gz:v1', out: join(root, 'out1') })
    expectSuccess(first)
    // the first machine's cache decompressed the gzip layers; the tier knows both forms and the links
    for (const l of image.layers) {
      const gz = await tierEntry(tier.host, 'cache/notes', l.digest)
      expect(gz?.json.annotations?.['dev.blobcache.decompressed']).toBe(l.diffID)
      const plain = await tierEntry(tier.host, 'cache/notes', l.diffID)
      expect(plain?.json.annotations?.['dev.blobcache.compressed']?.split('\n')).toContain(`${l.digest} gzip`)
    }

    cutOriginBlobs()
    const second = await copy({
      cache: join(root, 'B'), repo: 'cache/notes', image: 'notes/gz:v1', out: join(root, 'out2'), extra: ['--cache-compression', 'decompress'],
    })
    expectSuccess(second)
    expect(blobRequests(proxy)).toEqual([])
    expect(warningLines(second.stderr)).toEqual([])
    const out = await readLayout(join(root, 'out2'))
    // the layers are the uncompressed forms, which only the tier's notes named
    expect(out.manifest.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.diffID))
    expect(out.manifest.layers.map((l) => l.digest)).toEqual(out.config.rootfs.diff_ids)
    expect(out.manifest.layers.map((l) => l.mediaType)).toEqual(image.layers.map(() => OCI_TAR))
    expect(out.manifestDigest).not.toBe(image.manifestDigest)
    expect(sharedStatsOf(second).hits).toBeGreaterThanOrEqual(image.layers.length + 1)
  })

  it('notes written by one machine are used by the other for substitution (compress: background gzip variants)', async () => {
    const root = await testDir()
    const image = await originImage('notes/plain:v1', { layers: 2, layerSize: 128 << 10, compression: null, seed: 103 })
    const first = await copy({
      cache: join(root, 'A'), repo: 'cache/notes', image: 'notes/plain:v1', out: join(root, 'out1'), extra: ['--cache-compression', 'compress'],
    })
    expectSuccess(first)
    // the variants the first machine made in the background, as its local notes name them
    const variants: Digest[] = []
    for (const l of image.layers) {
      const note = (await readFile(join(root, 'A', `${l.diffID}.compressed`), 'utf8')).trim()
      const gz = note.split(' ')[0] as Digest
      variants.push(gz)
      const entry = await tierEntry(tier.host, 'cache/notes', gz)
      expect(entry?.json.annotations).toMatchObject({ 'dev.blobcache.kind': 'layer', 'dev.blobcache.compression': 'gzip', 'dev.blobcache.decompressed': l.diffID })
    }

    cutOriginBlobs()
    const second = await copy({
      cache: join(root, 'B'), repo: 'cache/notes', image: 'notes/plain:v1', out: join(root, 'out2'), extra: ['--cache-compression', 'compress'],
    })
    expectSuccess(second)
    expect(blobRequests(proxy)).toEqual([])
    expect(warningLines(second.stderr)).toEqual([])
    const out = await readLayout(join(root, 'out2'))
    expect(out.manifest.layers.map((l) => l.digest)).toEqual(variants)
    expect(out.manifest.layers.map((l) => l.mediaType)).toEqual(image.layers.map(() => OCI_TAR_GZIP))
    for (const [i, l] of out.manifest.layers.entries()) expect(digestOf(gunzipSync(out.blobs.get(l.digest)!))).toBe(image.layers[i].diffID)
    expect(out.config.rootfs.diff_ids).toEqual(image.layers.map((l) => l.diffID))
  })

  it('garbage-collect --delete-untagged between the two machines removes nothing the tier relies on', async () => {
    const root = await testDir()
    const gcTier = await startRegistry()
    try {
      const image = await originImage('gc/app:v1', { layers: 2, layerSize: 128 << 10, seed: 104 })
      const first = await copy({ cache: join(root, 'A'), tierHost: gcTier.host, repo: 'cache/gc', image: 'gc/app:v1', out: join(root, 'out1') })
      expectSuccess(first)
      const tagsBefore = await storedTags(gcTier.dir, 'cache/gc')
      expect(tagsBefore.length).toBeGreaterThanOrEqual(2 * image.layers.length + 1)
      // a blob no manifest names: the garbage collector must remove it, to show it really ran
      const orphan = await pushOrphanBlob(gcTier.host, 'cache/gc', randomBytesFrom(104, 'orphan', 64 << 10))
      expect(existsSync(blobDataPath(gcTier.dir, orphan))).toBe(true)

      await gcTier.halt()
      expect(gcTier.running).toBe(false)
      const output = await gcTier.garbageCollect({ deleteUntagged: true })
      await gcTier.restart()

      expect(output).toMatch(/blobs marked/)
      expect(existsSync(blobDataPath(gcTier.dir, orphan))).toBe(false)
      expect(await storedTags(gcTier.dir, 'cache/gc')).toEqual(tagsBefore)
      for (const d of [image.configDigest, ...image.layers.flatMap((l) => [l.digest, l.diffID])]) {
        expect(existsSync(blobDataPath(gcTier.dir, d))).toBe(true)
      }

      cutOriginBlobs()
      const second = await copy({ cache: join(root, 'B'), tierHost: gcTier.host, repo: 'cache/gc', image: 'gc/app:v1', out: join(root, 'out2') })
      await expectServedByTier(second, first, root, image.layers.length + 1)
    } finally {
      await gcTier.stop()
    }
  })
})
