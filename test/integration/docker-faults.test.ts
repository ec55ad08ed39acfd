// Copies through a fault-injecting proxy in front of the real registry: connections dropped
// mid-blob are resumed with Range, 500 and 429 (Retry-After) are retried, slow answers are
// waited for, and what cannot succeed fails with a typed error leaving nothing partial behind.
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { afterAll, afterEach, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { THREAD_HASH_MIN } from '../../src/io/blob-file.js'
import { type Digest, digestHex, digestOf } from '../../src/digest.js'
import { RegistryClient } from '../../src/registry/client.js'
import { openBlob } from '../../src/registry/download.js'
import { uploadBlob } from '../../src/registry/upload.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import { checkImage, readAll, tempLeftovers } from '../helpers/conformance.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

const registryBin = peer('docker-registry')
/** Quick retries, so that the failing cases give up within a second or two. */
const fast = { tlsVerify: false, retry: { attempts: 4, baseDelay: 50, maxDelay: 400 } }

async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-docker-faults-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

describe.skipIf(!registryBin)('docker:// through a fault-injecting proxy', () => {
  let registry: TestRegistry
  let proxy: FaultProxy
  let image: RandomImage
  let layout: string
  const source = () => registryRef(proxy.host, 'faults/app:v1', fast)
  const blobPath = (d: Digest) => new RegExp(`/blobs/${d}$`)
  const big = () => image.layers.reduce((a, b) => (b.size > a.size ? b : a))

  beforeAll(async () => {
    registry = await startRegistry()
    proxy = await startFaultProxy(registry.host)
    layout = await mkdtemp(join(tmpdir(), 'blobcache-docker-faults-src-'))
    image = await writeRandomImage(new OciLayoutReference(layout, 'v1'), { layers: 3, layerSize: 3 << 20, compression: null, seed: 8 })
    await copyImage(new OciLayoutReference(layout, 'v1'), registryRef(registry.host, 'faults/app:v1'), { compression: 'preserve' })
  })
  afterEach(() => {
    proxy.setRules([])
    proxy.clear()
  })
  afterAll(async () => {
    await proxy?.close()
    await registry?.stop()
    await rm(layout, { recursive: true, force: true })
  })

  it('resumes a blob whose connection drops mid-body, with Range from the last byte', async () => {
    const layer = big()
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), count: 2, fault: { kind: 'drop', afterBytes: 1 << 20 } }])
    const dir = await tempDir()
    const pulled = await copyImage(source(), new OciLayoutReference(dir, 'v1'))
    expect(pulled.digest).toBe(image.manifestDigest)
    const gets = proxy.requests.filter((r) => r.method === 'GET' && blobPath(layer.digest).test(r.path))
    expect(gets.map((r) => r.headers.range)).toEqual([undefined, 'bytes=1048576-', 'bytes=2097152-'])
    const src = await new OciLayoutReference(dir, 'v1').newImageSource()
    await checkImage(src, image)
    await src.close()
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('openBlob hashes across a resume and fails DIGEST_INVALID for bytes that do not match', async () => {
    const layer = big()
    const client = new RegistryClient(proxy.host, fast)
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), count: 1, fault: { kind: 'drop', afterBytes: 500_000 } }])
    const { stream } = await openBlob(client, 'faults/app', layer.digest, layer.size)
    expect(digestOf(await readAll(stream))).toBe(layer.digest)
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), fault: { kind: 'rewrite', rewrite: (a) => ({ ...a, body: Buffer.concat([Buffer.from([a.body[0] ^ 1]), a.body.subarray(1)]) }) } }])
    const bad = await openBlob(client, 'faults/app', layer.digest, layer.size)
    await expect(readAll(bad.stream)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    const unchecked = await openBlob(client, 'faults/app', layer.digest, layer.size, { verify: false })
    expect(digestOf(await readAll(unchecked.stream))).not.toBe(layer.digest)
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), fault: { kind: 'rewrite', rewrite: (a) => ({ ...a, body: a.body.subarray(1) }) } }])
    const short = await openBlob(client, 'faults/app', layer.digest, layer.size, { verify: false, resumes: 0 })
    await expect(readAll(short.stream)).rejects.toMatchObject({ code: 'SIZE_INVALID' })
  })

  it('fails with a typed error naming the blob once a cut connection has been resumed as often as allowed', async () => {
    const layer = big()
    const client = new RegistryClient(proxy.host, fast)
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), fault: { kind: 'drop', afterBytes: 100_000 } }])
    const whole = await openBlob(client, 'faults/app', layer.digest, layer.size, { verify: false, resumes: 2 })
    await expect(readAll(whole.stream)).rejects.toMatchObject({ code: 'REGISTRY_ERROR', registry: proxy.host, repository: 'faults/app', cause: { code: 'ECONNRESET' } })
    expect(proxy.requests.filter((r) => r.method === 'GET' && blobPath(layer.digest).test(r.path))).toHaveLength(3)
    const range = await openBlob(client, 'faults/app', layer.digest, layer.size, { range: { offset: 10, length: 1 << 20 } })
    await expect(readAll(range.stream)).rejects.toMatchObject({ code: 'REGISTRY_ERROR', repository: 'faults/app' })
  })

  it('retries 500s and honours 429 Retry-After', async () => {
    proxy.setRules([
      { method: 'GET', path: /\/manifests\/v1$/, count: 2, fault: { kind: 'status', status: 500, body: '{"errors":[{"code":"UNKNOWN","message":"boom"}]}' } },
      { method: 'GET', path: blobPath(image.configDigest), count: 1, fault: { kind: 'status', status: 429, headers: { 'retry-after': '1' } } },
    ])
    const dir = await tempDir()
    const started = Date.now()
    const pulled = await copyImage(source(), new OciLayoutReference(dir, 'v1'))
    expect(pulled.digest).toBe(image.manifestDigest)
    expect(Date.now() - started).toBeGreaterThanOrEqual(1000)
    expect(proxy.requests.filter((r) => r.fault).map((r) => r.status)).toEqual([500, 500, 429])
  })

  it('waits for slow answers', async () => {
    proxy.setRules([{ path: /\/blobs\//, fault: { kind: 'delay', ms: 150 } }])
    const dir = await tempDir()
    expect((await copyImage(source(), new OciLayoutReference(dir, 'v1'))).digest).toBe(image.manifestDigest)
    expect(proxy.requests.filter((r) => r.fault === 'delay').length).toBeGreaterThanOrEqual(4)
  })

  it('resumes a chunked upload after a failed PATCH and a reset PUT', async () => {
    const client = new RegistryClient(proxy.host, fast)
    const bytes = Buffer.alloc(5 * 65536 + 123, 'u')
    for (let i = 0; i < bytes.length; i += 4096) bytes[i] = i & 0xff
    proxy.setRules([
      { method: 'PATCH', path: /\/blobs\/uploads\//, count: 1, fault: { kind: 'status', status: 500 } },
      { method: 'PUT', path: /\/blobs\/uploads\//, count: 1, fault: { kind: 'reset' } },
    ])
    const stored = await uploadBlob(client, 'faults/upload', Readable.from([bytes]), { digest: digestOf(bytes), size: bytes.length }, { chunkSize: 65536 })
    expect(stored).toEqual({ digest: digestOf(bytes), size: bytes.length })
    // each retry first asks the registry how far the session got
    expect(proxy.requests.filter((r) => r.method === 'GET' && /\/blobs\/uploads\//.test(r.path)).map((r) => r.status)).toEqual([204, 204])
    const direct = await registryRef(registry.host, 'faults/upload:x').newImageSource()
    const blob = await direct.getBlob({ digest: digestOf(bytes), size: bytes.length })
    expect((await readAll(blob.stream)).equals(bytes)).toBe(true)
  })

  it('fails an upload cleanly when a PATCH answer is lost (distribution signs each session state)', async () => {
    const client = new RegistryClient(proxy.host, fast)
    const bytes = Buffer.alloc(3 * 65536, 'l')
    proxy.setRules([{ method: 'PATCH', path: /\/blobs\/uploads\//, count: 1, fault: { kind: 'drop', afterBytes: 0 } }])
    const put = uploadBlob(client, 'faults/lost', Readable.from([bytes]), { digest: digestOf(bytes), size: bytes.length }, { chunkSize: 65536 })
    await expect(put).rejects.toMatchObject({ code: 'BLOB_UPLOAD_INVALID', status: 404, repository: 'faults/lost' })
    const src = await registryRef(registry.host, 'faults/lost:x').newImageSource()
    await expect(src.getBlob({ digest: digestOf(bytes), size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('fails an upload at once when its session cannot be opened, while the source is still being read', async () => {
    const client = new RegistryClient(proxy.host, fast)
    proxy.setRules([{ method: 'POST', path: /\/blobs\/uploads\/$/, fault: { kind: 'status', status: 429 } }])
    // smaller than a chunk, so no PATCH waits on the session: only the POST can fail it; the
    // source gives 64 KiB every 100 ms, 40 times, far longer than the POST's retries take
    const piece = Buffer.alloc(65536, 's')
    let given = 0
    const slow = new Readable({
      read() {
        if (given === 40) return void this.push(null)
        setTimeout(() => this.push((given++, piece)), 100)
      },
    })
    const unhandled: unknown[] = []
    const onUnhandled = (reason: unknown) => unhandled.push(reason)
    process.on('unhandledRejection', onUnhandled)
    onTestFinished(() => void process.off('unhandledRejection', onUnhandled))
    const size = 40 * piece.length
    const put = uploadBlob(client, 'faults/refused', slow, { digest: digestOf(Buffer.alloc(size, 's')), size })
    await expect(put).rejects.toMatchObject({ code: 'TOOMANYREQUESTS', status: 429, repository: 'faults/refused' })
    expect(given).toBeLessThan(40)
    expect(slow.destroyed).toBe(true)
    await new Promise((resolve) => setTimeout(resolve, 50))
    expect(unhandled).toEqual([])
  })

  it('fails a pull cleanly when a blob keeps failing: typed error, nothing named in the layout', async () => {
    const layer = big()
    proxy.setRules([{ method: 'GET', path: blobPath(layer.digest), fault: { kind: 'status', status: 500 } }])
    const dir = await tempDir()
    const err = await copyImage(source(), new OciLayoutReference(dir, 'v1')).then(() => new Error('expected a failure'), (e: Error) => e)
    expect(err).toMatchObject({ code: 'REGISTRY_ERROR', status: 500, registry: proxy.host, repository: 'faults/app' })
    expect(err.message).toContain('HTTP 500')
    const files = (await readdir(dir, { recursive: true }).catch(() => [] as string[])).map(String)
    expect(files.filter((f) => f.split('/').pop()!.startsWith('.tmp-'))).toEqual([])
    expect(files.filter((f) => f.includes(digestHex(layer.digest)) || f.includes(digestHex(image.manifestDigest)))).toEqual([])
    const index = await readFile(join(dir, 'index.json'), 'utf8').catch(() => '')
    expect(index).not.toContain('"v1"')
  })

  it('fails a pull whose blob bytes do not match their digest, keeping none of them', async () => {
    const layer = big()
    proxy.setRules([
      {
        method: 'GET',
        path: blobPath(layer.digest),
        fault: { kind: 'rewrite', rewrite: (a) => ({ ...a, body: Buffer.concat([a.body.subarray(0, -1), Buffer.from([a.body.at(-1)! ^ 1])]) }) },
      },
    ])
    const dir = await tempDir()
    await expect(copyImage(source(), new OciLayoutReference(dir, 'v1'))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    const files = (await readdir(dir, { recursive: true }).catch(() => [] as string[])).map(String)
    expect(files.filter((f) => f.split('/').pop()!.startsWith('.tmp-') || f.includes(digestHex(layer.digest)))).toEqual([])
  })

  it('fails a pull of a large layer whose bytes do not match (read directly, in pooled slabs), keeping none of them', async () => {
    // at least THREAD_HASH_MIN (and so read straight from the socket into pooled slabs)
    const src = await tempDir()
    const large = await writeRandomImage(new OciLayoutReference(src, 'v1'), { layers: 1, layerSize: THREAD_HASH_MIN + (1 << 20), compression: null, seed: 81 })
    await copyImage(new OciLayoutReference(src, 'v1'), registryRef(registry.host, 'faults/large:v1'), { compression: 'preserve' })
    const layer = large.layers[0]
    expect(layer.size).toBeGreaterThanOrEqual(THREAD_HASH_MIN)
    proxy.setRules([
      {
        method: 'GET',
        path: blobPath(layer.digest),
        fault: { kind: 'rewrite', rewrite: (a) => ({ ...a, body: Buffer.concat([a.body.subarray(0, 1000), Buffer.from([a.body[1000] ^ 1]), a.body.subarray(1001)]) }) },
      },
    ])
    const dir = await tempDir()
    await expect(copyImage(registryRef(proxy.host, 'faults/large:v1', fast), new OciLayoutReference(dir, 'v1'))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    const files = (await readdir(dir, { recursive: true }).catch(() => [] as string[])).map(String)
    expect(files.filter((f) => f.split('/').pop()!.startsWith('.tmp-') || f.includes(digestHex(layer.digest)))).toEqual([])
    // and whole bytes pass
    proxy.setRules([])
    const good = await copyImage(registryRef(proxy.host, 'faults/large:v1', fast), new OciLayoutReference(dir, 'v1'))
    expect(good.digest).toBe(large.manifestDigest)
    expect(digestOf(await readFile(join(dir, 'blobs', 'sha256', digestHex(layer.digest))))).toBe(layer.digest)
  })

  it('fails a push cleanly when uploads keep failing: no tag, no upload data left', async () => {
    const dir = await tempDir()
    const other = await writeRandomImage(new OciLayoutReference(dir, 'v2'), { layers: 2, seed: 77 })
    proxy.setRules([{ method: 'PUT', path: /\/blobs\/uploads\//, fault: { kind: 'status', status: 503 } }])
    const dest = registryRef(proxy.host, 'faults/push:v2', fast)
    await expect(copyImage(new OciLayoutReference(dir, 'v2'), dest)).rejects.toMatchObject({ code: 'REGISTRY_ERROR', status: 503 })
    proxy.setRules([])
    const src = await registryRef(registry.host, 'faults/push:v2').newImageSource()
    await expect(src.getManifest()).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    for (const d of other.blobs.keys()) await expect(src.getBlob({ digest: d, size: -1 })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    const uploads = join(registry.dir, 'storage/docker/registry/v2/repositories/faults/push/_uploads')
    const left = (await readdir(uploads, { recursive: true }).catch(() => [] as string[])).map(String)
    expect(left.filter((p) => p.endsWith('/data'))).toEqual([])
  })
})
