// ImageCache against the real registry (docker-registry on 127.0.0.1), behind a logging proxy
// that counts requests: linuxkit-cache.md section 5, the [R] scenarios 6-15, 17, 26-28, 33, 36.
import { readFile, readdir, rm, stat, truncate } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Digest, digestHex, digestOf } from '../../src/digest.js'
import { ImageCache } from '../../src/image-cache/index.js'
import type { Descriptor, ImageIndex, Platform } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import type { ImageReference } from '../../src/types.js'
import { testDir } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { AMD64, ARM64, attestation } from '../helpers/image-cache-fixtures.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, buildRandomImage, putRandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, freePort, registryRef, startRegistry } from '../helpers/registry.js'
import { Readable } from 'node:stream'

const hasRegistry = peer('docker-registry') !== undefined
const REGISTRY_OPTIONS = { tlsVerify: false, retry: { attempts: 2, baseDelay: 20 } }

let registry: TestRegistry
let proxy: FaultProxy

/** Requests through the proxy to manifests and blobs (pings and token calls are not counted). */
function counts(p: FaultProxy = proxy) {
  const manifests = p.requests.filter((r) => /\/manifests\//.test(r.path))
  const blobs = p.requests.filter((r) => /\/blobs\/sha256:/.test(r.path))
  return { manifests: manifests.length, blobs: blobs.length, blobPaths: blobs.map((r) => r.path), all: manifests.length + blobs.length }
}

interface Extra {
  descriptor: Descriptor
  manifest: Buffer
  blobs: Buffer[]
}

/** Pushes images (and extra manifests such as attestations) and an index over them to `ref`. */
async function pushIndex(ref: ImageReference, images: RandomImage[], opts: { extra?: Extra[]; platform?: (im: RandomImage) => Platform | undefined } = {}): Promise<{ digest: Digest; index: ImageIndex }> {
  const dest = await ref.newImageDestination()
  try {
    for (const im of images) await putRandomImage(dest, im, true)
    for (const e of opts.extra ?? []) {
      for (const b of e.blobs) await dest.putBlob(Readable.from([b]), { digest: digestOf(b), size: b.length })
      await dest.putManifest(e.manifest, e.descriptor.digest)
    }
    const index: ImageIndex = {
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        ...images.map((im) => {
          const platform = opts.platform ? opts.platform(im) : im.platform
          return { mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length, ...(platform ? { platform } : {}) }
        }),
        ...(opts.extra ?? []).map((e) => e.descriptor),
      ],
    }
    const bytes = Buffer.from(JSON.stringify(index))
    await dest.putManifest(bytes)
    await dest.commit()
    return { digest: digestOf(bytes), index }
  } finally {
    await dest.close()
  }
}

async function twoArch(seed: number) {
  return [await buildRandomImage({ platform: AMD64, seed }), await buildRandomImage({ platform: ARM64, seed })]
}

async function open(): Promise<{ cache: ImageCache; dir: string }> {
  const dir = await testDir()
  return { cache: await ImageCache.open(dir, { registry: REGISTRY_OPTIONS }), dir }
}

const blobFile = (dir: string, d: Digest) => join(dir, 'blobs', 'sha256', digestHex(d))
const exists = (p: string) => stat(p).then(() => true, () => false)

describe.skipIf(!hasRegistry)('ImageCache with a registry', () => {
  beforeAll(async () => {
    registry = await startRegistry()
    proxy = await startFaultProxy(registry.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
  })

  it('6: pulling amd64 of a 2-arch index names one entry with the remote digest and media type, fetching no arm64 blob', async () => {
    const [amd, arm] = await twoArch(61)
    const { digest } = await pushIndex(registryRef(registry.host, 'six/app:1'), [amd, arm])
    const { cache, dir } = await open()
    proxy.clear()
    await cache.imagePull(`${proxy.host}/six/app:1`, { platforms: ['linux/amd64'] })
    const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8'))
    expect(index.manifests).toEqual([{
      mediaType: MediaType.ociIndex, digest, size: expect.any(Number),
      annotations: { 'org.opencontainers.image.ref.name': `${proxy.host}/six/app:1` },
    }])
    for (const l of arm.layers) expect(await exists(blobFile(dir, l.digest))).toBe(false)
    expect(await exists(blobFile(dir, arm.configDigest))).toBe(false)
    const fetched = counts().blobPaths.join()
    for (const l of arm.layers) expect(fetched).not.toContain(l.digest)
    expect(await cache.imageInCache(`${proxy.host}/six/app:1`, 'linux/amd64', { verify: true })).toBe(true)
  })

  it('7: a repeat pull makes no request; alwaysPull makes one manifest request and no blob request', async () => {
    const [amd, arm] = await twoArch(71)
    await pushIndex(registryRef(registry.host, 'seven/app:1'), [amd, arm])
    const { cache } = await open()
    const name = `${proxy.host}/seven/app:1`
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    proxy.clear()
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    expect(proxy.requests).toEqual([])
    await cache.imagePull(name, { platforms: ['linux/amd64'], alwaysPull: true })
    expect(counts()).toMatchObject({ manifests: 1, blobs: 0 })
  })

  it('8: a platform the index lacks fails naming it, and index.json is unchanged', async () => {
    const [amd, arm] = await twoArch(81)
    await pushIndex(registryRef(registry.host, 'eight/app:1'), [amd, arm])
    const { cache, dir } = await open()
    const before = await readFile(join(dir, 'index.json'))
    await expect(cache.imagePull(`${proxy.host}/eight/app:1`, { platforms: ['linux/riscv64'] }))
      .rejects.toMatchObject({ code: 'PLATFORM_UNKNOWN', message: expect.stringContaining('does not contain target platforms linux/riscv64') })
    expect(await readFile(join(dir, 'index.json'))).toEqual(before)
  })

  it('9: linux/arm64 matches an arm64/v8 entry, and arm64/v8 falls back to a plain arm64 entry', async () => {
    const v8 = await buildRandomImage({ platform: { os: 'linux', architecture: 'arm64', variant: 'v8' }, seed: 91 })
    await pushIndex(registryRef(registry.host, 'nine/v8:1'), [v8])
    const plain = await buildRandomImage({ platform: ARM64, seed: 92 })
    await pushIndex(registryRef(registry.host, 'nine/plain:1'), [plain])
    const { cache } = await open()
    await cache.imagePull(`${proxy.host}/nine/v8:1`, { platforms: ['linux/arm64'] })
    await cache.imagePull(`${proxy.host}/nine/plain:1`, { platforms: ['linux/arm64/v8'] })
    expect(await cache.imageInCache(`${proxy.host}/nine/v8:1`, 'linux/arm64')).toBe(true)
    expect(await cache.imageInCache(`${proxy.host}/nine/plain:1`, 'linux/arm64/v8')).toBe(true)
  })

  it('10: a single amd64 manifest does not satisfy arm64', async () => {
    await writeRandomImage(registryRef(registry.host, 'ten/app:1'), { platform: AMD64, seed: 101 })
    const { cache, dir } = await open()
    const before = await readFile(join(dir, 'index.json'))
    await expect(cache.imagePull(`${proxy.host}/ten/app:1`, { platforms: ['linux/arm64'] })).rejects.toMatchObject({ code: 'PLATFORM_UNKNOWN' })
    expect(await readFile(join(dir, 'index.json'))).toEqual(before)
    const d = await cache.imagePull(`${proxy.host}/ten/app:1`, { platforms: ['linux/amd64'] })
    expect(d.mediaType).toBe(MediaType.ociManifest)
  })

  it('11: a moved tag: without alwaysPull the old digest stays (offline); alwaysPull takes the new one', async () => {
    const first = await writeRandomImage(registryRef(registry.host, 'eleven/app:1'), { platform: AMD64, seed: 111 })
    const { cache } = await open()
    const name = `${proxy.host}/eleven/app:1`
    expect((await cache.imagePull(name, { platforms: ['linux/amd64'] })).digest).toBe(first.manifestDigest)
    const second = await writeRandomImage(registryRef(registry.host, 'eleven/app:1'), { platform: AMD64, seed: 112 })
    proxy.clear()
    expect((await cache.imagePull(name, { platforms: ['linux/amd64'] })).digest).toBe(first.manifestDigest)
    expect(proxy.requests).toEqual([])
    expect((await cache.imagePull(name, { platforms: ['linux/amd64'], alwaysPull: true })).digest).toBe(second.manifestDigest)
    expect((await cache.findDescriptor(name))?.digest).toBe(second.manifestDigest)
  })

  it('12: a deleted layer or a truncated config is repaired by the next pull', async () => {
    const [amd, arm] = await twoArch(121)
    await pushIndex(registryRef(registry.host, 'twelve/app:1'), [amd, arm])
    const { cache, dir } = await open()
    const name = `${proxy.host}/twelve/app:1`
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    await rm(blobFile(dir, amd.layers[0].digest))
    await truncate(blobFile(dir, amd.configDigest), 5)
    expect(await cache.imageInCache(name, 'linux/amd64')).toBe(false)
    proxy.clear()
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    expect(counts()).toMatchObject({ manifests: 1, blobs: 2 })
    expect(await cache.imageInCache(name, 'linux/amd64', { verify: true })).toBe(true)
  })

  it('13: with the registry down a cached image still pulls, an uncached one fails, a cached digest needs no network', async () => {
    const down = await startFaultProxy(registry.host)
    const [amd, arm] = await twoArch(131)
    const { digest } = await pushIndex(registryRef(registry.host, 'thirteen/app:1'), [amd, arm])
    const { cache } = await open()
    await cache.imagePull(`${down.host}/thirteen/app:1`, { platforms: ['linux/amd64'] })
    await down.close()
    await cache.imagePull(`${down.host}/thirteen/app:1`, { platforms: ['linux/amd64'] })
    await expect(cache.imagePull(`${down.host}/thirteen/other:1`, { platforms: ['linux/amd64'] })).rejects.toMatchObject({ code: 'REGISTRY_ERROR' })
    proxy.clear()
    const byDigest = `${proxy.host}/elsewhere/x@${digest}`
    expect((await cache.imagePull(byDigest, { platforms: ['linux/amd64'] })).digest).toBe(digest)
    expect(proxy.requests).toEqual([])
    expect((await cache.list()).map((e) => e.name)).toContain(byDigest)
  })

  it('14: an index entry without a platform does not crash a pull, twice; an unplatformed amd64 image is found by its config', async () => {
    const [amd, arm] = await twoArch(141)
    const loose = await buildRandomImage({ platform: { os: 'linux', architecture: 's390x' }, seed: 142 })
    await pushIndex(registryRef(registry.host, 'fourteen/app:1'), [amd, arm, loose], { platform: (im) => (im === loose ? undefined : im.platform) })
    const { cache } = await open()
    const name = `${proxy.host}/fourteen/app:1`
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    expect(await cache.imageInCache(name, 'linux/amd64')).toBe(true)
    await cache.imagePull(name, { platforms: ['linux/s390x'] })
    expect(await cache.imageInCache(name, 'linux/s390x')).toBe(true)
  })

  it('15: attestations of the pulled platform are cached; sboms() returns the SPDX document', async () => {
    const [amd, arm] = await twoArch(151)
    const spdx = { spdxVersion: 'SPDX-2.3', name: 'sbom of amd64' }
    const attAmd = attestation(amd.manifestDigest, spdx)
    const attArm = attestation(arm.manifestDigest, { spdxVersion: 'SPDX-2.3', name: 'sbom of arm64' })
    await pushIndex(registryRef(registry.host, 'fifteen/app:1'), [amd, arm], { extra: [attAmd, attArm] })
    const { cache, dir } = await open()
    const name = `${proxy.host}/fifteen/app:1`
    await cache.imagePull(name, { platforms: ['linux/amd64'] })
    expect(await exists(blobFile(dir, attAmd.descriptor.digest))).toBe(true)
    expect(await exists(blobFile(dir, attArm.descriptor.digest))).toBe(false)
    const sboms = await (await cache.newSource(name, 'linux/amd64')).sboms()
    expect(sboms.map((b) => JSON.parse(b.toString()))).toEqual([spdx])
  })

  it('17: imageInRegistry is true for an offered arch, false for another or a missing repo, and an error when the registry is down', async () => {
    const [amd, arm] = await twoArch(171)
    await pushIndex(registryRef(registry.host, 'seventeen/app:1'), [amd, arm])
    await writeRandomImage(registryRef(registry.host, 'seventeen/single:1'), { platform: ARM64, seed: 172 })
    const { cache } = await open()
    expect(await cache.imageInRegistry(`${proxy.host}/seventeen/app:1`, 'linux/arm64')).toBe(true)
    expect(await cache.imageInRegistry(`${proxy.host}/seventeen/app:1`, 'linux/ppc64le')).toBe(false)
    expect(await cache.imageInRegistry(`${proxy.host}/seventeen/single:1`, 'linux/arm64')).toBe(true)
    expect(await cache.imageInRegistry(`${proxy.host}/seventeen/single:1`, 'linux/amd64')).toBe(false)
    expect(await cache.imageInRegistry(`${proxy.host}/no/such-repo:1`, 'linux/amd64')).toBe(false)
    expect(await cache.imageInRegistry(`${proxy.host}/seventeen/app:nope`, 'linux/amd64')).toBe(false)
    const dead = `127.0.0.1:${await freePort()}`
    await expect(cache.imageInRegistry(`${dead}/seventeen/app:1`, 'linux/amd64')).rejects.toMatchObject({ code: 'REGISTRY_ERROR' })
  })

  it('26: pushing to an absent tag gives the local digest; without override an existing different tag is left alone', async () => {
    const { cache, dir } = await open()
    const [amd, arm] = await twoArch(261)
    await pushIndex(registryRef(registry.host, 'src26/app:1'), [amd, arm])
    await cache.imagePull(`${proxy.host}/src26/app:1`, { platforms: ['linux/amd64', 'linux/arm64'] })
    const local = (await cache.findDescriptor(`${proxy.host}/src26/app:1`))!
    const result = await cache.push(`${proxy.host}/src26/app:1`, { remoteName: `${proxy.host}/dst26/app:1` })
    expect(result).toMatchObject({ pushed: true, digest: local.digest })
    const remote = (await cache.imageInRegistry(`${proxy.host}/dst26/app:1`, 'linux/arm64'))
    expect(remote).toBe(true)
    const other = await writeRandomImage(registryRef(registry.host, 'dst26/taken:1'), { platform: AMD64, seed: 262 })
    const skipped = await cache.push(`${proxy.host}/src26/app:1`, { remoteName: `${proxy.host}/dst26/taken:1` })
    expect(skipped).toMatchObject({ pushed: false, digest: other.manifestDigest })
    const check = await ImageCache.open(join(dir, 'check'), { registry: REGISTRY_OPTIONS })
    expect((await check.imagePull(`${proxy.host}/dst26/taken:1`, { platforms: ['linux/amd64'] })).digest).toBe(other.manifestDigest)
    expect((await check.imagePull(`${proxy.host}/dst26/app:1`, { platforms: ['linux/amd64'] })).digest).toBe(local.digest)
  })

  it('27: override onto a remote index with s390x merges; the dangling remote attestation goes', async () => {
    const { cache } = await open()
    const [amd, arm] = await twoArch(271)
    await pushIndex(registryRef(registry.host, 'src27/app:1'), [amd, arm])
    await cache.imagePull(`${proxy.host}/src27/app:1`, { platforms: ['linux/amd64', 'linux/arm64'] })
    const oldAmd = await buildRandomImage({ platform: AMD64, seed: 272 })
    const s390 = await buildRandomImage({ platform: { os: 'linux', architecture: 's390x' }, seed: 273 })
    const oldAtt = attestation(oldAmd.manifestDigest, { spdxVersion: 'SPDX-2.3' })
    const s390Att = attestation(s390.manifestDigest, { spdxVersion: 'SPDX-2.3', name: 's390x' })
    await pushIndex(registryRef(registry.host, 'dst27/app:1'), [oldAmd, s390], { extra: [oldAtt, s390Att] })
    const result = await cache.push(`${proxy.host}/src27/app:1`, { remoteName: `${proxy.host}/dst27/app:1`, override: true })
    expect(result.pushed).toBe(true)
    const check = await ImageCache.open(await testDir(), { registry: REGISTRY_OPTIONS })
    const d = await check.imagePull(`${proxy.host}/dst27/app:1`, { platforms: ['linux/s390x'] })
    expect(d.digest).toBe(result.digest)
    const merged = JSON.parse(await readFile(blobFile(check.dir, d.digest), 'utf8')) as ImageIndex
    expect(merged.manifests.map((m) => m.digest)).toEqual([amd.manifestDigest, arm.manifestDigest, s390.manifestDigest, s390Att.descriptor.digest])
    expect(await check.imageInRegistry(`${proxy.host}/dst27/app:1`, 'linux/amd64')).toBe(true)
  })

  it('28: arch tags name -amd64 and -arm64, never -unknown; the local index.json is unchanged', async () => {
    const { cache, dir } = await open()
    const [amd, arm] = await twoArch(281)
    const att = attestation(amd.manifestDigest, { spdxVersion: 'SPDX-2.3' })
    await pushIndex(registryRef(registry.host, 'src28/app:1'), [amd, arm], { extra: [att] })
    await cache.imagePull(`${proxy.host}/src28/app:1`, { platforms: ['linux/amd64', 'linux/arm64'] })
    const before = await readFile(join(dir, 'index.json'))
    const result = await cache.push(`${proxy.host}/src28/app:1`, { remoteName: `${proxy.host}/dst28/app:1`, archTags: true })
    expect(result.tags).toEqual(['1', '1-amd64', '1-arm64'])
    expect(await readFile(join(dir, 'index.json'))).toEqual(before)
    const check = await ImageCache.open(await testDir(), { registry: REGISTRY_OPTIONS })
    expect((await check.imagePull(`${proxy.host}/dst28/app:1-amd64`, { platforms: ['linux/amd64'] })).digest).toBe(amd.manifestDigest)
    expect((await check.imagePull(`${proxy.host}/dst28/app:1-arm64`, { platforms: ['linux/arm64'] })).digest).toBe(arm.manifestDigest)
    expect(await check.imageInRegistry(`${proxy.host}/dst28/app:1-unknown`, 'linux/amd64')).toBe(false)
  })

  it('33: clean with publishedOnly removes only names whose remote digest matches', async () => {
    const { cache } = await open()
    const published = await writeRandomImage(registryRef(registry.host, 'thirtythree/pub:1'), { platform: AMD64, seed: 331 })
    await cache.imagePull(`${proxy.host}/thirtythree/pub:1`, { platforms: ['linux/amd64'] })
    await writeRandomImage(registryRef(registry.host, 'thirtythree/moved:1'), { platform: AMD64, seed: 332 })
    await cache.imagePull(`${proxy.host}/thirtythree/moved:1`, { platforms: ['linux/amd64'] })
    await writeRandomImage(registryRef(registry.host, 'thirtythree/moved:1'), { platform: AMD64, seed: 333 })
    const removed = await cache.clean({ publishedOnly: true })
    expect(removed).toEqual([`${proxy.host}/thirtythree/pub:1`])
    expect((await cache.list()).map((e) => e.name)).toEqual([`${proxy.host}/thirtythree/moved:1`])
    expect(await cache.imageInCache(`${proxy.host}/thirtythree/moved:1`, 'linux/amd64')).toBe(true)
    expect(published.manifestDigest).toMatch(/^sha256:/)
  })

  it('36: the index lock is not held during a download: readers and writers go on while a pull is slow', async () => {
    const [amd, arm] = await twoArch(361)
    await pushIndex(registryRef(registry.host, 'thirtysix/app:1'), [amd, arm])
    const { cache, dir } = await open()
    const other = await ImageCache.open(dir)
    const seed = await writeRandomImage(registryRef(registry.host, 'thirtysix/seed:1'), { platform: AMD64, seed: 362 })
    await cache.imagePull(`${proxy.host}/thirtysix/seed:1`, { platforms: ['linux/amd64'] })
    proxy.setRules([{ path: /\/blobs\/sha256:/, method: 'GET', fault: { kind: 'delay', ms: 1500 } }])
    try {
      const pulling = cache.imagePull(`${proxy.host}/thirtysix/app:1`, { platforms: ['linux/amd64'] })
      await new Promise((r) => setTimeout(r, 300))
      const t0 = Date.now()
      expect(await other.list()).toHaveLength(1)
      await other.descriptorWrite('meanwhile:1', (await other.findDescriptor(`${proxy.host}/thirtysix/seed:1`))!)
      expect(Date.now() - t0).toBeLessThan(700)
      await pulling
    } finally {
      proxy.setRules([])
    }
    expect((await cache.list()).map((e) => e.name).sort()).toEqual([`${proxy.host}/thirtysix/app:1`, `${proxy.host}/thirtysix/seed:1`, 'docker.io/library/meanwhile:1'].sort())
    expect(seed.manifestDigest).toBeDefined()
    expect((await readdir(join(dir, 'blobs', 'sha256'))).filter((n) => n.startsWith('.tmp-'))).toEqual([])
  })

  it('an aborted pull rejects with the reason and leaves no temp file and no name', async () => {
    const [amd, arm] = await twoArch(371)
    await pushIndex(registryRef(registry.host, 'abort/app:1'), [amd, arm])
    const { cache, dir } = await open()
    proxy.setRules([{ path: /\/blobs\/sha256:/, method: 'GET', fault: { kind: 'delay', ms: 1000 } }])
    try {
      const ac = new AbortController()
      const reason = new Error('stop now')
      setTimeout(() => ac.abort(reason), 300)
      await expect(cache.imagePull(`${proxy.host}/abort/app:1`, { platforms: ['linux/amd64'], signal: ac.signal })).rejects.toBe(reason)
    } finally {
      proxy.setRules([])
    }
    await new Promise((r) => setTimeout(r, 1200)) // let the delayed answers arrive and be dropped
    expect((await readdir(join(dir, 'blobs', 'sha256'))).filter((n) => n.startsWith('.tmp-'))).toEqual([])
    expect(await cache.list()).toEqual([])
  })
})
