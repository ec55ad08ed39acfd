// Random but reproducible test images (go-containerregistry's random.Image): real tar layers,
// a config whose rootfs.diff_ids match them, and a manifest, written through any transport's
// ImageDestination. The same options and seed always give the same digests.
import { createCipheriv, createHash } from 'node:crypto'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzipSync } from 'node:zlib'
import { compressStream } from '../../src/compression.js'
import { type Digest, digestOf } from '../../src/digest.js'
import { type ImageIndex, type ImageManifest, type Platform, layerMediaType, manifestMediaTypeFor } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import type { ImageDestination, ImageReference } from '../../src/types.js'
import { makeLayer } from './make-layer.js'

/** Options of {@link buildRandomImage} and {@link writeRandomImage}. */
export interface RandomImageOptions {
  /** Number of layers. Default 2. */
  layers?: number
  /** Bytes of random file content in each layer. Default 4096. */
  layerSize?: number
  /** Layer compression; null for plain tar. Default 'gzip'. */
  compression?: 'gzip' | 'zstd' | null
  /** Manifest format. Default 'oci'. */
  format?: 'oci' | 'v2s2'
  /** Platform recorded in the config. Default linux/amd64. */
  platform?: Platform
  /** Seed of the content. Default 1. */
  seed?: number
}

/** One layer of a random image. */
export interface RandomLayer {
  /** Digest of the (possibly compressed) blob. */
  digest: Digest
  /** Digest of the uncompressed tar. */
  diffID: Digest
  /** Size of the blob. */
  size: number
  mediaType: string
}

/** A random image held in memory. */
export interface RandomImage {
  manifestDigest: Digest
  manifest: Buffer
  mediaType: string
  configDigest: Digest
  config: Buffer
  layers: RandomLayer[]
  platform: Platform
  /** Every blob (layers and config) by digest. */
  blobs: Map<Digest, Buffer>
}

/** A random multi-platform index and its images. */
export interface RandomIndex {
  indexDigest: Digest
  index: Buffer
  mediaType: string
  images: RandomImage[]
}

/** `n` pseudo-random bytes from `seed` and `label` (AES-CTR keyed by their hash). */
export function randomBytesFrom(seed: number, label: string, n: number): Buffer {
  const key = createHash('sha256').update(`${seed}/${label}`).digest()
  return createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16)).update(Buffer.alloc(n))
}

async function compress(tar: Buffer, compression: 'gzip' | 'zstd' | null): Promise<Buffer> {
  if (compression === null) return tar
  if (compression === 'gzip') return gzipSync(tar)
  const chunks: Buffer[] = []
  const sink = new Writable({ write(chunk: Buffer, _enc, cb) { chunks.push(chunk); cb() } })
  await pipeline(Readable.from([tar]), compressStream('zstd'), sink)
  return Buffer.concat(chunks)
}

/** Builds a random image in memory. */
export async function buildRandomImage(opts: RandomImageOptions = {}): Promise<RandomImage> {
  const seed = opts.seed ?? 1
  const format = opts.format ?? 'oci'
  const compression = opts.compression === undefined ? 'gzip' : opts.compression
  const platform = opts.platform ?? { os: 'linux', architecture: 'amd64' }
  const blobs = new Map<Digest, Buffer>()
  const layers: RandomLayer[] = []
  for (let i = 0; i < (opts.layers ?? 2); i++) {
    const tar = makeLayer([
      { name: `layer-${i}`, type: 'dir' },
      { name: `layer-${i}/random-${seed}.bin`, content: randomBytesFrom(seed, `${platform.architecture}/${i}`, opts.layerSize ?? 4096) },
    ])
    const blob = await compress(tar, compression)
    const digest = digestOf(blob)
    blobs.set(digest, blob)
    layers.push({ digest, diffID: digestOf(tar), size: blob.length, mediaType: layerMediaType(MediaType.ociLayer, compression, format) })
  }
  const config = Buffer.from(JSON.stringify({
    created: '1970-01-01T00:00:00Z',
    architecture: platform.architecture,
    os: platform.os,
    ...(platform.variant ? { variant: platform.variant } : {}),
    config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Labels: { seed: String(seed) } },
    rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffID) },
    history: layers.map((_, i) => ({ created: '1970-01-01T00:00:00Z', created_by: `random layer ${i}` })),
  }))
  const configDigest = digestOf(config)
  blobs.set(configDigest, config)
  const mediaType = manifestMediaTypeFor(format)
  const manifest: ImageManifest = {
    schemaVersion: 2,
    mediaType,
    config: { mediaType: format === 'oci' ? MediaType.ociConfig : MediaType.dockerConfig, digest: configDigest, size: config.length },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
  }
  const bytes = Buffer.from(JSON.stringify(manifest))
  return { manifestDigest: digestOf(bytes), manifest: bytes, mediaType, configDigest, config, layers, platform, blobs }
}

/** Puts the blobs and manifest of `image` into `dest` (as an instance of a list when `instance`). */
export async function putRandomImage(dest: ImageDestination, image: RandomImage, instance = false): Promise<void> {
  for (const l of image.layers) {
    await dest.putBlob(Readable.from([image.blobs.get(l.digest)!]), { digest: l.digest, size: l.size, mediaType: l.mediaType })
  }
  await dest.putBlob(Readable.from([image.config]), { digest: image.configDigest, size: image.config.length }, { isConfig: true })
  await dest.putManifest(image.manifest, instance ? image.manifestDigest : undefined)
}

/** Builds a random image and writes it to `ref` (putBlob, putManifest, commit, close). */
export async function writeRandomImage(ref: ImageReference, opts: RandomImageOptions = {}): Promise<RandomImage> {
  const image = await buildRandomImage(opts)
  const dest = await ref.newImageDestination()
  try {
    await putRandomImage(dest, image)
    await dest.commit()
  } finally {
    await dest.close()
  }
  return image
}

/** Builds one random image per platform and writes them to `ref` with an index naming them. */
export async function writeRandomIndex(
  ref: ImageReference,
  platforms: Platform[],
  opts: Omit<RandomImageOptions, 'platform'> = {},
): Promise<RandomIndex> {
  const format = opts.format ?? 'oci'
  const images: RandomImage[] = []
  for (const [i, platform] of platforms.entries()) images.push(await buildRandomImage({ ...opts, platform, seed: (opts.seed ?? 1) * 1000 + i }))
  const mediaType = manifestMediaTypeFor(format, true)
  const index: ImageIndex = {
    schemaVersion: 2,
    mediaType,
    manifests: images.map((im) => ({ mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length, platform: im.platform })),
  }
  const bytes = Buffer.from(JSON.stringify(index))
  const dest = await ref.newImageDestination()
  try {
    for (const im of images) await putRandomImage(dest, im, true)
    await dest.putManifest(bytes)
    await dest.commit()
  } finally {
    await dest.close()
  }
  return { indexDigest: digestOf(bytes), index: bytes, mediaType, images }
}
