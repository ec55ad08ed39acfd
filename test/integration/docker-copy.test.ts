// copyImage to and from docker:// against the real registry: single and multi-arch images both
// ways, existing blobs skipped, blobs mounted across repositories, and skopeo interop (what we
// push skopeo reads with the same manifest digest, and the reverse).
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { copyImage } from '../../src/copy.js'
import { digestOf } from '../../src/digest.js'
import { mayLendSlabs, slabCounts } from '../../src/io/hash-thread.js'
import { clearBlobLocations } from '../../src/registry/locations.js'
import { dir as dirTransport } from '../../src/transports/dir.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import { checkImage } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage, writeRandomIndex } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import { skopeoOk } from '../helpers/skopeo.js'

const registryBin = peer('docker-registry')
const skopeo = peer('skopeo')

/** `skopeo inspect [--raw] --tls-verify=false NAME`: its output. */
async function inspect(name: string, raw = false): Promise<string> {
  return (await skopeoOk(['inspect', ...(raw ? ['--raw'] : []), '--tls-verify=false', name])).stdout
}

async function layoutDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-docker-copy-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

describe.skipIf(!registryBin)('copyImage with docker://', () => {
  let registry: TestRegistry
  let proxy: FaultProxy
  const platforms = [
    { os: 'linux', architecture: 'amd64' },
    { os: 'linux', architecture: 'arm64' },
  ]

  beforeAll(async () => {
    registry = await startRegistry()
    proxy = await startFaultProxy(registry.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
  })
  const count = (method: string, path: RegExp) => proxy.requests.filter((r) => r.method === method && path.test(r.path)).length

  it('a pull into a layout carries large layers in pooled slabs that are reused, never through a BlobCache that tees them', async () => {
    const dir = await layoutDir()
    const image = await writeRandomImage(new OciLayoutReference(join(dir, 'src'), 'v1'), { layers: 3, layerSize: 12 << 20, seed: 41 })
    await copyImage(new OciLayoutReference(join(dir, 'src'), 'v1'), registryRef(registry.host, 'copy/slabs:v1'))
    const before = slabCounts()
    const pulled = await copyImage(registryRef(registry.host, 'copy/slabs:v1'), new OciLayoutReference(join(dir, 'dst'), 'v1'))
    expect(pulled.digest).toBe(image.manifestDigest)
    const dst = await new OciLayoutReference(join(dir, 'dst'), 'v1').newImageSource()
    await checkImage(dst, image)
    await dst.close()
    const lent = slabCounts()
    // 36 MiB in 1 MiB pieces: slabs given back once written are taken again
    expect(lent.reused - before.reused).toBeGreaterThan(0)
    expect(lent.made - before.made + lent.reused - before.reused).toBeGreaterThanOrEqual(36)
    const [from, to] = [await registryRef(registry.host, 'copy/slabs:v1').newImageSource(), await new OciLayoutReference(join(dir, 'x'), 'v1').newImageDestination()]
    expect(mayLendSlabs(from, to)).toBe(true)
    await Promise.all([from.close(), to.close()])
    // through a BlobCache (which tees each chunk to its own file too) nothing is lent, and both
    // the cache and the layout get whole blobs
    const cache = join(dir, 'cache')
    await mkdir(cache)
    const wrapped = new BlobCache(new OciLayoutReference(join(dir, 'dst2'), 'v1'), cache)
    await copyImage(registryRef(registry.host, 'copy/slabs:v1'), wrapped)
    expect(slabCounts()).toEqual(lent)
    const dst2 = await new OciLayoutReference(join(dir, 'dst2'), 'v1').newImageSource()
    await checkImage(dst2, image)
    await dst2.close()
    for (const layer of image.layers) expect(digestOf(await readFile(join(cache, layer.digest)))).toBe(layer.digest)
  })

  it('pushes oci: -> docker:// and pulls it back with the same digests', async () => {
    const dir = await layoutDir()
    const image = await writeRandomImage(new OciLayoutReference(join(dir, 'src'), 'v1'), { layers: 3, layerSize: 200_000, seed: 1 })
    const pushed = await copyImage(new OciLayoutReference(join(dir, 'src'), 'v1'), registryRef(proxy.host, 'copy/single:v1'))
    expect(pushed).toMatchObject({ digest: image.manifestDigest, copied: 4, reused: 0 })
    const pulled = await copyImage(registryRef(proxy.host, 'copy/single:v1'), new OciLayoutReference(join(dir, 'dst'), 'v1'))
    expect(pulled.digest).toBe(image.manifestDigest)
    const src = await new OciLayoutReference(join(dir, 'dst'), 'v1').newImageSource()
    await checkImage(src, image)
    await src.close()
  })

  it('pushes and pulls a multi-arch index with every instance', async () => {
    const dir = await layoutDir()
    const written = await writeRandomIndex(new OciLayoutReference(join(dir, 'src'), 'multi'), platforms, { layers: 2 })
    const pushed = await copyImage(new OciLayoutReference(join(dir, 'src'), 'multi'), registryRef(proxy.host, 'copy/multi:v1'), { imageListSelection: 'all' })
    expect(pushed.digest).toBe(written.indexDigest)
    const pulled = await copyImage(registryRef(proxy.host, 'copy/multi:v1'), new OciLayoutReference(join(dir, 'dst'), 'multi'), { imageListSelection: 'all' })
    expect(pulled.digest).toBe(written.indexDigest)
    const src = await new OciLayoutReference(join(dir, 'dst'), 'multi').newImageSource()
    for (const image of written.images) await checkImage(src, image, image.manifestDigest)
    await src.close()
    // one platform only: the instance, by its own digest
    const arm = await copyImage(registryRef(proxy.host, 'copy/multi:v1'), new OciLayoutReference(join(dir, 'arm'), 'x'), { platform: platforms[1] })
    expect(arm.digest).toBe(written.images[1].manifestDigest)
  })

  it('re-pushing skips every blob the registry already holds (HEAD only)', async () => {
    const dir = await layoutDir()
    const ref = new OciLayoutReference(join(dir, 'src'), 'v1')
    await writeRandomImage(ref, { layers: 3, seed: 2 })
    await copyImage(ref, registryRef(proxy.host, 'copy/again:v1'))
    proxy.clear()
    const again = await copyImage(ref, registryRef(proxy.host, 'copy/again:v2'))
    expect(again).toMatchObject({ copied: 0, reused: 4 })
    expect(count('HEAD', /\/blobs\/sha256:/)).toBe(4)
    expect(count('POST', /\/blobs\/uploads\//) + count('PATCH', /./) + count('PUT', /\/blobs\//)).toBe(0)
    expect(count('PUT', /\/manifests\/v2$/)).toBe(1)
  })

  it('a re-push to a name that already holds the manifest writes nothing (one manifest HEAD, as crane); rewriteExisting writes it all again', async () => {
    const dir = await layoutDir()
    const ref = new OciLayoutReference(join(dir, 'src'), 'v1')
    const image = await writeRandomImage(ref, { layers: 3, seed: 21 })
    const first = await copyImage(ref, registryRef(proxy.host, 'copy/same:v1'))
    expect(first).toMatchObject({ copied: 4, present: [] })
    expect(count('HEAD', /\/manifests\/v1$/)).toBe(1)
    proxy.clear()
    const again = await copyImage(ref, registryRef(proxy.host, 'copy/same:v1'))
    expect(again).toMatchObject({ digest: image.manifestDigest, copied: 0, reused: 0, present: [image.manifestDigest] })
    expect(proxy.requests.filter((r) => r.method !== 'GET' || r.path !== '/v2/').map((r) => `${r.method} ${r.path} ${r.status}`))
      .toEqual([`HEAD /v2/copy/same/manifests/v1 200`])
    // by digest too
    proxy.clear()
    const pinned = await copyImage(ref, registryRef(proxy.host, `copy/same@${image.manifestDigest}`))
    expect(pinned.present).toEqual([image.manifestDigest])
    expect(count('HEAD', /\/blobs\//) + count('PUT', /./)).toBe(0)
    // asked to, it writes everything again
    proxy.clear()
    const forced = await copyImage(ref, registryRef(proxy.host, 'copy/same:v1'), { rewriteExisting: true })
    expect(forced).toMatchObject({ copied: 0, reused: 4, present: [] })
    expect(count('HEAD', /\/manifests\//)).toBe(0)
    expect(count('HEAD', /\/blobs\//)).toBe(4)
    expect(count('PUT', /\/manifests\/v1$/)).toBe(1)
  })

  it('the manifest HEAD starts with the warm-up; when it fails it is asked again, and a registry that lies about the digest gets the push', async () => {
    const dir = await layoutDir()
    const ref = new OciLayoutReference(join(dir, 'src'), 'v1')
    const image = await writeRandomImage(ref, { layers: 1, seed: 24 })
    await copyImage(ref, registryRef(proxy.host, 'copy/early:v1'))
    proxy.clear()
    proxy.setRules([{ method: 'HEAD', path: /\/manifests\/v1$/, count: 1, fault: { kind: 'status', status: 400 } }])
    try {
      const again = await copyImage(ref, registryRef(proxy.host, 'copy/early:v1'))
      expect(again.present).toEqual([image.manifestDigest])
      expect(proxy.requests.filter((r) => r.method === 'HEAD').map((r) => r.status)).toEqual([400, 200])
      // an answer naming another digest is not the manifest: everything is checked and written
      proxy.clear()
      const other = `sha256:${'0'.repeat(64)}`
      proxy.setRules([{ method: 'HEAD', path: /\/manifests\/v1$/, fault: { kind: 'rewrite', rewrite: (a) => ({ ...a, headers: { ...a.headers, 'docker-content-digest': other } }) } }])
      const lied = await copyImage(ref, registryRef(proxy.host, 'copy/early:v1'))
      expect(lied).toMatchObject({ present: [], reused: 2 })
      expect(count('PUT', /\/manifests\/v1$/)).toBe(1)
    } finally {
      proxy.setRules([])
    }
  })

  it('a name holding another manifest, or a copy that changes the manifest, is written as before', async () => {
    const dir = await layoutDir()
    const a = new OciLayoutReference(join(dir, 'a'), 'v1')
    const b = new OciLayoutReference(join(dir, 'b'), 'v1')
    await writeRandomImage(a, { layers: 2, seed: 22 })
    const imageB = await writeRandomImage(b, { layers: 2, seed: 23 })
    await copyImage(a, registryRef(proxy.host, 'copy/moved:v1'))
    proxy.clear()
    const moved = await copyImage(b, registryRef(proxy.host, 'copy/moved:v1'))
    expect(moved).toMatchObject({ digest: imageB.manifestDigest, copied: 3, present: [] })
    expect(count('PUT', /\/manifests\/v1$/)).toBe(1)
    expect(digestOf(Buffer.from(await inspect(`docker://${registry.host}/copy/moved:v1`, true)))).toBe(imageB.manifestDigest)
    // converting to Docker schema 2 makes another manifest: the registry is not even asked
    proxy.clear()
    const converted = await copyImage(b, registryRef(proxy.host, 'copy/moved:v1'), { manifestFormat: 'v2s2' })
    expect(converted.digest).not.toBe(imageB.manifestDigest)
    expect(converted.present).toEqual([])
    expect(count('HEAD', /\/manifests\//)).toBe(0)
    expect(count('PUT', /\/manifests\/v1$/)).toBe(1)
    // and back: the tag now names the converted manifest, so the OCI one is written again
    proxy.clear()
    const back = await copyImage(b, registryRef(proxy.host, 'copy/moved:v1'))
    expect(back).toMatchObject({ digest: imageB.manifestDigest, present: [] })
    expect(count('HEAD', /\/manifests\/v1$/)).toBe(1)
    expect(count('PUT', /\/manifests\/v1$/)).toBe(1)
  })

  it('a list already under its tag is skipped whole; under a new tag its instances are found by digest, and only the list is written', async () => {
    const dir = await layoutDir()
    const src = new OciLayoutReference(join(dir, 'src'), 'multi')
    const written = await writeRandomIndex(src, platforms, { layers: 2 })
    await copyImage(src, registryRef(proxy.host, 'copy/lists:v1'), { imageListSelection: 'all' })
    proxy.clear()
    const again = await copyImage(src, registryRef(proxy.host, 'copy/lists:v1'), { imageListSelection: 'all' })
    expect(again).toMatchObject({ digest: written.indexDigest, copied: 0, reused: 0, present: [written.indexDigest] })
    expect(count('HEAD', /./)).toBe(1)
    expect(count('PUT', /./)).toBe(0)
    proxy.clear()
    const retag = await copyImage(src, registryRef(proxy.host, 'copy/lists:v2'), { imageListSelection: 'all' })
    expect(retag).toMatchObject({ digest: written.indexDigest, copied: 0, reused: 0, present: written.images.map((i) => i.manifestDigest) })
    expect(count('HEAD', /\/blobs\//)).toBe(0)
    expect(proxy.requests.filter((r) => r.method === 'PUT').map((r) => r.path)).toEqual(['/v2/copy/lists/manifests/v2'])
    const pulled = await copyImage(registryRef(proxy.host, 'copy/lists:v2'), new OciLayoutReference(join(dir, 'dst'), 'multi'), { imageListSelection: 'all' })
    expect(pulled.digest).toBe(written.indexDigest)
    const dst = await new OciLayoutReference(join(dir, 'dst'), 'multi').newImageSource()
    for (const image of written.images) await checkImage(dst, image, image.manifestDigest)
    await dst.close()
  })

  it('mounts blobs from another repository of the same registry instead of uploading them', async () => {
    clearBlobLocations()
    const dir = await layoutDir()
    const ref = new OciLayoutReference(join(dir, 'src'), 'v1')
    await writeRandomImage(ref, { layers: 2, seed: 3 })
    await copyImage(ref, registryRef(proxy.host, 'copy/origin:v1'))
    proxy.clear()
    const moved = await copyImage(registryRef(proxy.host, 'copy/origin:v1'), registryRef(proxy.host, 'other/place:v1'))
    expect(moved.reused).toBe(3)
    expect(proxy.requests.filter((r) => /\?mount=sha256/.test(r.path)).map((r) => r.status)).toEqual([201, 201, 201])
    expect(count('GET', /\/blobs\/sha256:/) + count('PATCH', /./) + count('PUT', /\/blobs\//)).toBe(0)
  })

  it('works inside a BlobCache: pushed blobs are teed into the cache, and a pull then reads none from the registry', async () => {
    const dir = await layoutDir()
    const image = await writeRandomImage(new OciLayoutReference(join(dir, 'src'), 'v1'), { layers: 2, seed: 6 })
    const cacheDir = join(dir, 'cache')
    await mkdir(cacheDir)
    const pushed = await copyImage(new OciLayoutReference(join(dir, 'src'), 'v1'), new BlobCache(registryRef(proxy.host, 'copy/cached:v1'), cacheDir))
    expect(pushed.digest).toBe(image.manifestDigest)
    await checkImage(await registryRef(registry.host, 'copy/cached:v1').newImageSource(), image)
    proxy.clear()
    const pulled = await copyImage(new BlobCache(registryRef(proxy.host, 'copy/cached:v1'), cacheDir), new OciLayoutReference(join(dir, 'dst'), 'v1'))
    expect(pulled.digest).toBe(image.manifestDigest)
    expect(count('GET', /\/blobs\/sha256:/)).toBe(0)
    expect(count('GET', /\/manifests\//)).toBeGreaterThanOrEqual(1)
    await checkImage(await new OciLayoutReference(join(dir, 'dst'), 'v1').newImageSource(), image)
  })

  describe.skipIf(!skopeo)('skopeo interop', () => {
    it.for(['oci', 'v2s2'] as const)('what skopeo pushes (%s) we pull with the same manifest digest', async (format) => {
      const dir = await layoutDir()
      // skopeo 1.9's oci: transport reads only OCI manifests from a layout; it converts on push
      const image = await writeRandomImage(new OciLayoutReference(join(dir, 'src'), 'v1'), { layers: 2, seed: 4 })
      const name = `docker://${registry.host}/skopeo/pushed-${format}:v1`
      await skopeoOk(['copy', '--dest-tls-verify=false', ...(format === 'v2s2' ? ['--format', 'v2s2'] : []), `oci:${join(dir, 'src')}:v1`, name])
      const theirs = JSON.parse(await inspect(name)) as { Digest: string; Layers: string[] }
      const raw = await inspect(name, true)
      expect(digestOf(raw)).toBe(theirs.Digest)
      // oci: layouts hold OCI manifests only, so a Docker one is pulled into dir:, byte for byte
      const target = format === 'oci' ? new OciLayoutReference(join(dir, 'dst'), 'v1') : dirTransport.parseReference(join(dir, 'dst'))
      const pulled = await copyImage(registryRef(registry.host, `skopeo/pushed-${format}:v1`), target)
      expect(pulled.digest).toBe(theirs.Digest)
      expect(pulled.manifest.toString()).toBe(raw)
      if (format === 'oci') {
        expect(pulled.digest).toBe(image.manifestDigest)
        const src = await new OciLayoutReference(join(dir, 'dst'), 'v1').newImageSource()
        await checkImage(src, image)
        await src.close()
      }
      expect(theirs.Layers).toEqual(image.layers.map((l) => l.digest))
    })

    it('what we push skopeo pulls with the same manifest digest', async () => {
      const dir = await layoutDir()
      const written = await writeRandomIndex(new OciLayoutReference(join(dir, 'src'), 'multi'), platforms, { layers: 2, seed: 5 })
      const pushed = await copyImage(new OciLayoutReference(join(dir, 'src'), 'multi'), registryRef(registry.host, 'ours/pushed:v1'), { imageListSelection: 'all' })
      expect(pushed.digest).toBe(written.indexDigest)
      const args = ['--src-tls-verify=false', '--multi-arch', 'all', '--preserve-digests']
      await skopeoOk(['copy', ...args, `docker://${registry.host}/ours/pushed:v1`, `oci:${join(dir, 'skopeo')}:v1`])
      const index = JSON.parse(await readFile(join(dir, 'skopeo', 'index.json'), 'utf8')) as { manifests: { digest: string }[] }
      expect(index.manifests.map((m) => m.digest)).toEqual([written.indexDigest])
      const raw = await inspect(`docker://${registry.host}/ours/pushed:v1`, true)
      expect(raw).toBe(written.index.toString())
      const instance = JSON.parse(await inspect(`docker://${registry.host}/ours/pushed@${written.images[0].manifestDigest}`)) as { Digest: string; Layers: string[] }
      expect(instance.Digest).toBe(written.images[0].manifestDigest)
      expect(instance.Layers).toEqual(written.images[0].layers.map((l) => l.digest))
    })
  })
})
