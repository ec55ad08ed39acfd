// The docker:// transport against the real registry (no auth): the shared conformance suite,
// then the protocol one piece at a time, counting requests through the fault proxy in
// pass-through mode.
import { readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { digestOf, verifyDigest } from '../../src/digest.js'
import { MediaType } from '../../src/media-types.js'
import { RegistryClient } from '../../src/registry/client.js'
import { clearBlobLocations } from '../../src/registry/locations.js'
import { uploadBlob } from '../../src/registry/upload.js'
import { type DockerReference, docker, listTags } from '../../src/transports/docker.js'
import type { SystemContext } from '../../src/types.js'
import { checkImage, describeTransport, readAll } from '../helpers/conformance.js'
import { type FaultProxy, type ProxiedAnswer, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { buildRandomImage, putRandomImage, writeRandomImage, writeRandomIndex } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

const registryBin = peer('docker-registry')
const ctx: SystemContext = { registry: { tlsVerify: false } }

/** Pages a registry's whole tag list by `?n=&last=`, adding `Link` headers. */
function paginate(answer: ProxiedAnswer, path: string): ProxiedAnswer {
  const url = new URL(path, 'http://x')
  const doc = JSON.parse(answer.body.toString()) as { name: string; tags: string[] }
  const n = Number(url.searchParams.get('n') ?? 1000)
  const last = url.searchParams.get('last')
  const all = [...doc.tags].sort()
  const from = last ? all.indexOf(last) + 1 : 0
  const page = all.slice(from, from + n)
  const headers = { ...answer.headers }
  if (from + n < all.length) headers.link = `<${url.pathname}?n=${n}&last=${page[page.length - 1]}>; rel="next"`
  return { ...answer, headers, body: Buffer.from(JSON.stringify({ name: doc.name, tags: page })) }
}

describe.skipIf(!registryBin)('docker:// against docker-registry (no auth)', () => {
  let registry: TestRegistry
  let proxy: FaultProxy
  let n = 0
  const ref = (name: string, host = proxy.host) => docker.parseReference(`//${host}/${name}`) as DockerReference
  const at = (name: string, host = proxy.host) => registryRef(host, name)

  beforeAll(async () => {
    registry = await startRegistry()
    proxy = await startFaultProxy(registry.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
  })

  describeTransport('docker', () => at(`conformance/image${++n}:latest`, registry.host), {})

  const requests = (method: string, path: RegExp) => proxy.requests.filter((r) => r.method === method && path.test(r.path))

  it('pushes a blob in chunks (POST, PATCH…, PUT) and a small one monolithically', async () => {
    const client = new RegistryClient(proxy.host, { tlsVerify: false })
    const big = Buffer.alloc(300_000, 'b')
    proxy.clear()
    const stored = await uploadBlob(client, 'proto/chunks', Readable.from([big.subarray(0, 70_000), big.subarray(70_000)]), { size: -1 }, { chunkSize: 64 << 10 })
    expect(stored).toEqual({ digest: digestOf(big), size: big.length })
    expect(requests('POST', /\/blobs\/uploads\/$/)).toHaveLength(1)
    expect(requests('PATCH', /\/blobs\/uploads\//)).toHaveLength(4)
    expect(requests('PUT', /\/blobs\/uploads\/.*digest=/)).toHaveLength(1)

    const small = Buffer.from('small blob')
    proxy.clear()
    await uploadBlob(client, 'proto/chunks', Readable.from([small]), { digest: digestOf(small), size: small.length })
    expect(proxy.requests.map((r) => r.method)).toEqual(['POST', 'PUT'])

    const src = await ref('proto/chunks:any').newImageSource(ctx)
    const blob = await src.getBlob({ digest: digestOf(big), size: big.length })
    expect((await readAll(blob.stream)).equals(big)).toBe(true)
  })

  it('sends a chunk of a known-size blob while it is still being read', async () => {
    const client = new RegistryClient(proxy.host, { tlsVerify: false })
    const bytes = Buffer.alloc(200_000, 's')
    proxy.clear()
    let patchSeenEarly = false
    const source = Readable.from((async function* () {
      yield bytes.subarray(0, 10_000)
      // the rest of the first chunk only comes once its PATCH has reached the registry
      for (let i = 0; i < 200 && requests('PATCH', /\/blobs\/uploads\//).length === 0; i++) await new Promise((r) => setTimeout(r, 10))
      patchSeenEarly = requests('PATCH', /\/blobs\/uploads\//).length > 0
      yield bytes.subarray(10_000)
    })())
    const stored = await uploadBlob(client, 'proto/streamed', source, { digest: digestOf(bytes), size: bytes.length }, { chunkSize: 64 << 10 })
    expect(stored).toEqual({ digest: digestOf(bytes), size: bytes.length })
    expect(patchSeenEarly).toBe(true)
    expect(proxy.requests.filter((r) => r.path.includes('/blobs/uploads/')).map((r) => r.method)).toEqual(['POST', 'PATCH', 'PATCH', 'PATCH', 'PUT'])
  })

  it('takes the digest from a hashing stream instead of hashing again, and stops a mismatch before the PUT', async () => {
    const client = new RegistryClient(proxy.host, { tlsVerify: false })
    const bytes = Buffer.alloc(150_000, 'h')
    const hashing = verifyDigest()
    const stored = await uploadBlob(client, 'proto/hashing', Readable.from([bytes]).pipe(hashing), { size: -1 }, { chunkSize: 64 << 10 })
    expect(stored).toEqual({ digest: digestOf(bytes), size: bytes.length })
    proxy.clear()
    const claimed = digestOf('something else')
    const put = uploadBlob(client, 'proto/hashing', Readable.from([bytes]).pipe(verifyDigest()), { digest: claimed, size: -1 }, { chunkSize: 64 << 10 })
    await expect(put).rejects.toMatchObject({ code: 'DIGEST_INVALID', expected: claimed, actual: digestOf(bytes) })
    expect(requests('PUT', /./)).toEqual([])
    expect(requests('DELETE', /\/blobs\/uploads\//).map((r) => r.status)).toEqual([204])
  })

  it('pushes and pulls a multi-arch index; instances by digest, the index by tag at commit', async () => {
    const target = at('proto/multi:v1')
    proxy.clear()
    const written = await writeRandomIndex(target, [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }])
    const manifestPuts = requests('PUT', /\/manifests\//).map((r) => r.path.split('/manifests/')[1])
    expect(manifestPuts).toEqual([...written.images.map((i) => i.manifestDigest), 'v1'])
    const src = await target.newImageSource()
    const top = await src.getManifest()
    expect(top.bytes.equals(written.index)).toBe(true)
    expect(top.mediaType).toBe(MediaType.ociIndex)
    for (const image of written.images) await checkImage(src, image, image.manifestDigest)
    const byDigest = await at(`proto/multi@${written.indexDigest}`).newImageSource()
    expect((await byDigest.getManifest()).bytes.equals(written.index)).toBe(true)
  })

  it('skips blobs already present (HEAD) and mounts blobs from another repository', async () => {
    clearBlobLocations()
    const image = await writeRandomImage(at('proto/mount-src:v1'), { layers: 2, seed: 42 })
    // reading the source's manifest teaches the process where its blobs live
    const src = await at('proto/mount-src:v1').newImageSource()
    await src.getManifest()
    const dest = await at('proto/mount-dst:v1').newImageDestination()
    proxy.clear()
    for (const layer of image.layers) {
      expect(await dest.tryReusingBlob({ digest: layer.digest, size: layer.size })).toEqual({ digest: layer.digest, size: layer.size })
    }
    const mounts = requests('POST', /\/v2\/proto\/mount-dst\/blobs\/uploads\/\?mount=/)
    expect(mounts).toHaveLength(2)
    expect(mounts.every((r) => r.status === 201)).toBe(true)
    proxy.clear()
    expect(await dest.tryReusingBlob({ digest: image.layers[0].digest, size: image.layers[0].size })).toBeDefined()
    expect(proxy.requests.map((r) => `${r.method} ${r.status}`)).toEqual(['HEAD 200'])
    expect(await dest.tryReusingBlob({ digest: digestOf('nowhere'), size: 7 })).toBeUndefined()
  })

  it('lists tags across Link pages', async () => {
    const image = await buildRandomImage({ layers: 1, seed: 5 })
    const dest = await at('proto/tags:t0').newImageDestination()
    await putRandomImage(dest, image)
    await dest.commit()
    for (const tag of ['t1', 't2', 't3', 't4']) {
      const d = await at(`proto/tags:${tag}`).newImageDestination()
      await d.putManifest(image.manifest)
      await d.commit()
    }
    // distribution 2.8 answers every tag in one page; the proxy pages its real answer the way
    // distribution 3 and other registries do (`?n=&last=`, `Link: <…>; rel="next"`)
    const whole = await listTags(ref('proto/tags:t0'), { ...ctx, pageSize: 2 })
    expect(whole.sort()).toEqual(['t0', 't1', 't2', 't3', 't4'])
    proxy.setRules([{ path: /\/tags\/list/, fault: { kind: 'rewrite', rewrite: paginate } }])
    proxy.clear()
    try {
      const tags = await listTags(ref('proto/tags:t0'), { ...ctx, pageSize: 2 })
      expect(tags).toEqual(['t0', 't1', 't2', 't3', 't4'])
      expect(requests('GET', /\/tags\/list/).map((r) => r.path.split('?')[1])).toEqual(['n=2', 'n=2&last=t1', 'n=2&last=t3'])
    } finally {
      proxy.setRules([])
    }
    await expect(listTags(ref('proto/none:x'), ctx)).rejects.toMatchObject({ code: 'NAME_UNKNOWN', status: 404 })
  })

  it('deletes an image by digest, and reads MANIFEST_UNKNOWN / BLOB_UNKNOWN for what is missing', async () => {
    const target = at('proto/delete:gone')
    const image = await writeRandomImage(target, { layers: 1, seed: 9 })
    await target.deleteImage()
    const src = await target.newImageSource()
    await expect(src.getManifest()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN', status: 404, registry: proxy.host, repository: 'proto/delete' })
    await expect(src.getManifest(image.manifestDigest)).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(at('proto/never:x').newImageSource().then((s) => s.getManifest())).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expect(src.getBlob({ digest: digestOf('absent'), size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN', status: 404 })
    const err = await src.getManifest().then(() => new Error('expected a failure'), (e: Error) => e)
    expect(err.message).toContain(`${proxy.host}/proto/delete`)
    expect(err.message).toContain('HTTP 404')
  })

  it('reads byte ranges of a blob (getBlobAt)', async () => {
    const bytes = Buffer.from(Array.from({ length: 100_000 }, (_, i) => i % 251))
    const client = new RegistryClient(registry.host, { tlsVerify: false })
    await uploadBlob(client, 'proto/ranges', Readable.from([bytes]), { size: bytes.length })
    const src = await at('proto/ranges:x').newImageSource()
    const parts: Buffer[] = []
    for await (const part of src.getBlobAt!({ digest: digestOf(bytes), size: bytes.length }, [{ offset: 10, length: 5 }, { offset: 99_990, length: -1 }])) {
      parts.push(await readAll(part))
    }
    expect(parts).toEqual([bytes.subarray(10, 15), bytes.subarray(99_990)])
  })

  it('aborts a blob download at once with the signal reason', async () => {
    const big = Buffer.alloc(8 << 20, 'z')
    const client = new RegistryClient(registry.host, { tlsVerify: false })
    await uploadBlob(client, 'proto/abort', Readable.from([big]), { size: -1 })
    const src = await at('proto/abort:x').newImageSource()
    const controller = new AbortController()
    const reason = new Error('stop')
    proxy.setRules([{ path: /\/blobs\/sha256:/, fault: { kind: 'delay', ms: 5000 } }])
    try {
      const started = Date.now()
      setTimeout(() => controller.abort(reason), 100)
      await expect(src.getBlob({ digest: digestOf(big), size: big.length }, { signal: controller.signal })).rejects.toBe(reason)
      expect(Date.now() - started).toBeLessThan(2000)
    } finally {
      proxy.setRules([])
    }
    const mid = new AbortController()
    const midReason = new Error('stop mid-body')
    const { stream } = await src.getBlob({ digest: digestOf(big), size: big.length }, { signal: mid.signal })
    stream.once('data', () => mid.abort(midReason))
    await expect(readAll(stream)).rejects.toBe(midReason)
  })

  it('cancels the upload session when the stream fails, and the registry refuses a wrong digest', async () => {
    const client = new RegistryClient(registry.host, { tlsVerify: false })
    const boom = new Error('source failed')
    const failing = Readable.from((async function* () {
      yield Buffer.alloc(100_000, 'q')
      yield Buffer.alloc(100_000, 'r')
      throw boom
    })())
    await expect(uploadBlob(client, 'proto/cancel', failing, { size: -1 }, { chunkSize: 64 << 10 })).rejects.toBe(boom)
    // distribution removes a cancelled session's data and keeps only its empty hash-state folder
    const uploads = join(registry.dir, 'storage/docker/registry/v2/repositories/proto/cancel/_uploads')
    const left = (await readdir(uploads, { recursive: true }).catch(() => [] as string[])).map(String)
    expect(left.filter((p) => p.endsWith('/data') || p.endsWith('/startedat'))).toEqual([])

    const bytes = Buffer.alloc(200_000, 'q')
    const claimed = digestOf('other')
    await expect(uploadBlob(client, 'proto/cancel', Readable.from([bytes]), { digest: claimed, size: -1 }, { chunkSize: 64 << 10 })).rejects.toMatchObject({
      code: 'DIGEST_INVALID',
      status: 400,
    })
    const src = await at('proto/cancel:x', registry.host).newImageSource()
    await expect(src.getBlob({ digest: claimed, size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    await expect(src.getBlob({ digest: digestOf(bytes), size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

})
