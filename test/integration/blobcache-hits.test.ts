// A cache hit copied into a local destination: the entry was verified when it was written and
// is stamped (src/blobcache/stamp.ts), so it is handed out unread and hard-linked into the
// destination; a write to either name loses the stamp, and the next hit hashes the entry,
// drops it when damaged and reads the source instead.
import { chmod, lstat, mkdir, mkdtemp, open, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { hasVerifiedStamp } from '../../src/blobcache/stamp.js'
import { copyImage } from '../../src/copy.js'
import { digestHex, digestOf } from '../../src/digest.js'
import { MediaType } from '../../src/media-types.js'
import { DirReference } from '../../src/transports/dir.js'
import { makeLayer } from '../helpers/make-layer.js'

describe('cache hits into a local destination', () => {
  let root: string
  const tar = makeLayer([{ name: 'hello', content: 'hello world\n'.repeat(50_000) }])
  const layer = gzipSync(tar)
  const layerDigest = digestOf(layer)
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [digestOf(tar)] } }))
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: [{ mediaType: MediaType.ociLayerGzip, digest: layerDigest, size: layer.length }],
  }))

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'blobcache-hits-'))
    const src = new DirReference(join(root, 'src'))
    const dest = await src.newImageDestination()
    await dest.putBlob(Readable.from([layer]), { digest: layerDigest, size: layer.length, mediaType: MediaType.ociLayerGzip })
    await dest.putBlob(Readable.from([config]), { digest: digestOf(config), size: config.length }, { isConfig: true })
    await dest.putManifest(manifest)
    await dest.commit()
    await dest.close()
  })
  afterAll(() => rm(root, { recursive: true, force: true }))

  it('a stamped hit is hard-linked into dir:, and a write to it there makes the next hit re-read the source', async () => {
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    const src = new DirReference(join(root, 'src'))
    // the first copy fills the cache through the cache-wrapped destination
    await copyImage(src, new BlobCache(new DirReference(join(root, 'out0')), cacheDir))
    const entry = join(cacheDir, layerDigest)
    expect(await hasVerifiedStamp(entry)).toBe(true)

    // the second reads through the cache: the layer is the cache entry itself (same inode)
    const cachedSrc = new BlobCache(src, cacheDir)
    await copyImage(cachedSrc, new DirReference(join(root, 'out1')))
    const out1 = join(root, 'out1', digestHex(layerDigest))
    expect((await lstat(out1)).ino).toBe((await lstat(entry)).ino)
    expect(digestOf(await readFile(out1))).toBe(layerDigest)
    expect(cachedSrc.stats.hits).toBeGreaterThan(0)

    // someone writes into the destination's file: the shared entry is damaged and unstamped
    const fh = await open(out1, 'r+')
    await fh.write(Buffer.from([0xff]), 0, 1, 100)
    await fh.close()
    expect(await hasVerifiedStamp(entry)).toBe(false)

    // the next copy hashes the entry, drops it, and takes the layer from the source
    const again = new BlobCache(src, cacheDir)
    await copyImage(again, new DirReference(join(root, 'out2')))
    const out2 = join(root, 'out2', digestHex(layerDigest))
    expect(digestOf(await readFile(out2))).toBe(layerDigest)
    expect(again.stats.errors).toBeGreaterThan(0)
    await expect(lstat(entry)).rejects.toMatchObject({ code: 'ENOENT' })
  })

  it('a file of another mode is copied, not linked, and its mode is left alone', async () => {
    const cacheDir = join(root, 'cache-mode')
    await mkdir(cacheDir)
    const src = new DirReference(join(root, 'src'))
    await copyImage(src, new BlobCache(new DirReference(join(root, 'm0')), cacheDir))
    const entry = join(cacheDir, layerDigest)
    await chmod(entry, 0o600)
    await copyImage(new BlobCache(src, cacheDir), new DirReference(join(root, 'm1')))
    const out = join(root, 'm1', digestHex(layerDigest))
    expect((await lstat(out)).ino).not.toBe((await lstat(entry)).ino)
    expect((await lstat(out)).mode & 0o777).toBe(0o644)
    expect((await lstat(entry)).mode & 0o777).toBe(0o600)
    expect(digestOf(await readFile(out))).toBe(layerDigest)
  })
})
