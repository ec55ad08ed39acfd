// One cache directory shared with buildah (Debian's buildah 1.28, containers/image's blob
// cache) in both directions, with vfs storage in a throw-away root and only local images:
// - buildah pull --blob-cache D fills D; we then serve a copy from D alone;
// - we fill D (including a gzip variant only we made, in compress mode); buildah push
//   --blob-cache D then pushes our cached blobs byte for byte.
import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { promisify } from 'node:util'
import { gzipSync } from 'node:zlib'
import { describe, expect, it, onTestFinished } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { copyImage } from '../../src/copy.js'
import { type Digest, digestHex, digestOf, isDigest } from '../../src/digest.js'
import { parseManifest } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { DirReference } from '../../src/transports/dir.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import { makeLayer } from '../helpers/make-layer.js'
import { peer } from '../helpers/peers.js'
import { randomBytesFrom } from '../helpers/random-image.js'

const run = promisify(execFile)
const buildahPath = peer('buildah')
const isRoot = process.getuid?.() === 0

/** Runs buildah against a private vfs store under `root`, accepting any image (local transports only). */
function buildah(root: string) {
  return async (...args: string[]) => {
    const [cmd, ...rest] = args
    const global = ['--root', join(root, 'storage'), '--runroot', join(root, 'run'), '--storage-driver', 'vfs']
    const policy = ['pull', 'push'].includes(cmd) ? ['--signature-policy', join(root, 'policy.json')] : []
    const { stdout } = await run(buildahPath!, [...global, cmd, ...policy, ...rest], { maxBuffer: 16 << 20 })
    return stdout
  }
}

/** An OCI layout `layout:latest` with a gzip layer and an uncompressed layer. */
async function writeLayout(root: string) {
  const gzTar = makeLayer([{ name: 'a.bin', content: randomBytesFrom(7, 'a', 200_000) }])
  const plain = makeLayer([{ name: 'b.txt', content: 'uncompressed layer\n'.repeat(5000) }])
  const gz = gzipSync(gzTar)
  const config = Buffer.from(JSON.stringify({
    architecture: 'amd64', os: 'linux', config: {},
    rootfs: { type: 'layers', diff_ids: [digestOf(gzTar), digestOf(plain)] },
    history: [{ created_by: 'layer a' }, { created_by: 'layer b' }],
  }))
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2, mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: [
      { mediaType: MediaType.ociLayerGzip, digest: digestOf(gz), size: gz.length },
      { mediaType: MediaType.ociLayer, digest: digestOf(plain), size: plain.length },
    ],
  }))
  const layoutDir = join(root, 'layout')
  await mkdir(layoutDir)
  const ref = new OciLayoutReference(layoutDir, 'latest')
  const dest = await ref.newImageDestination()
  for (const blob of [gz, plain]) await dest.putBlob(Readable.from([blob]), { digest: digestOf(blob), size: blob.length })
  await dest.putBlob(Readable.from([config]), { digest: digestOf(config), size: config.length }, { isConfig: true })
  await dest.putManifest(manifest)
  await dest.commit()
  await dest.close()
  return { ref, layoutDir, gz: digestOf(gz), gzDiffID: digestOf(gzTar), plain: digestOf(plain), config: digestOf(config), manifest: digestOf(manifest) }
}

async function setup() {
  // buildah names an image pulled from oci: after its path, which must then be lowercase
  const root = join(tmpdir(), `blobcache-buildah-${randomBytes(6).toString('hex')}`)
  await mkdir(root)
  onTestFinished(() => rm(root, { recursive: true, force: true }))
  await writeFile(join(root, 'policy.json'), JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }))
  const b = buildah(root)
  const image = await writeLayout(root)
  return { root, b, image }
}

describe.skipIf(!buildahPath || !isRoot)('blob cache shared with buildah', () => {
  it('a directory filled by buildah pull --blob-cache serves our copy of the stripped image', async () => {
    const { root, b, image } = await setup()
    const D = join(root, 'D')
    await mkdir(D)
    await b('pull', '--quiet', '--blob-cache', D, `oci:${image.layoutDir}:latest`)
    const names = (await readdir(D)).sort()
    // buildah's format: both layers, the decompressed gzip layer with its notes, config, manifest
    expect(names).toEqual([
      image.gz, `${image.gz}.decompressed`, image.gzDiffID, `${image.gzDiffID}.compressed`,
      image.plain, `${image.config}.config`, image.manifest,
    ].sort())
    expect(await readFile(join(D, `${image.gzDiffID}.compressed`), 'utf8')).toBe(image.gz)
    for (const n of names) {
      const d = n.replace(/\.config$/, '')
      if (isDigest(d)) expect(digestOf(await readFile(join(D, n)))).toBe(d)
    }

    // strip the layout of everything but its manifest: only the cache can serve the rest
    const blobs = join(image.layoutDir, 'blobs', 'sha256')
    for (const hex of await readdir(blobs)) if (`sha256:${hex}` !== image.manifest) await rm(join(blobs, hex))
    await expect(copyImage(image.ref, new DirReference(join(root, 'plain')))).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    const cache = new BlobCache(image.ref, D, 'decompress')
    const out = join(root, 'out')
    await copyImage(cache, new DirReference(out))
    const parsed = parseManifest(await readFile(join(out, 'manifest.json')))
    if (parsed.kind !== 'image') throw new Error('not an image')
    // decompress mode substitutes buildah's decompressed entry for the gzip layer
    expect(parsed.manifest.layers.map((l) => [l.digest, l.mediaType])).toEqual([
      [image.gzDiffID, MediaType.ociLayer],
      [image.plain, MediaType.ociLayer],
    ])
    for (const l of [parsed.manifest.config, ...parsed.manifest.layers]) {
      expect(digestOf(await readFile(join(out, digestHex(l.digest))))).toBe(l.digest)
    }
    expect(cache.stats.errors).toBe(0)
  })

  it('a directory we filled is used by buildah push --blob-cache: the pushed layers are our cached blobs', async () => {
    const { root, b, image } = await setup()
    await b('pull', '--quiet', `oci:${image.layoutDir}:latest`)
    const D = join(root, 'D')
    await mkdir(D)
    // compress mode: the uncompressed layer also gets a gzip variant that only we made
    await copyImage(image.ref, new BlobCache(new DirReference(join(root, 'ours')), D, 'compress'))
    const note = (await readFile(join(D, `${image.plain}.compressed`), 'utf8')).trim()
    expect(isDigest(note)).toBe(true) // a single gzip variant: the legacy one-line form buildah reads
    const ourVariant = note as Digest

    const id = (await b('images', '-q')).trim().split('\n')[0]
    const out = join(root, 'pushed')
    await b('push', '--quiet', '--blob-cache', D, id, `dir:${out}`)
    const pushed = parseManifest(await readFile(join(out, 'manifest.json')))
    if (pushed.kind !== 'image') throw new Error('not an image')
    expect(pushed.manifest.layers.map((l) => l.digest)).toEqual([image.gz, ourVariant])
    for (const l of pushed.manifest.layers) {
      expect((await readFile(join(out, digestHex(l.digest)))).equals(await readFile(join(D, l.digest)))).toBe(true)
    }

    // without the cache buildah compresses on its own, and gets other bytes
    const alone = join(root, 'alone')
    await b('push', '--quiet', id, `dir:${alone}`)
    const own = parseManifest(await readFile(join(alone, 'manifest.json')))
    if (own.kind !== 'image') throw new Error('not an image')
    expect(own.manifest.layers.map((l) => l.digest)).not.toContain(ourVariant)
  })
})
