// Source images for the crash, concurrency and disk-full tests: a few images that share layers
// (so that processes overlap), in every layer compression (so that a blob cache in `compress`
// mode has variants to make), written into one `oci:` layout, as OCI archives for imageLoad,
// and optionally pushed to a test registry for imagePull.
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzipSync } from 'node:zlib'
import { compressStream } from '../../src/compression.js'
import { type Digest, digestOf } from '../../src/digest.js'
import { type ImageManifest, type Platform, layerMediaType } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import type { ImageReference } from '../../src/types.js'
import { imageBlobs, ociArchiveFiles, tarOf } from './image-cache-fixtures.js'
import { makeLayer } from './make-layer.js'
import { type RandomImage, type RandomLayer, putRandomImage, randomBytesFrom } from './random-image.js'

/** One layer of a fixture image: its content seed, size and compression. */
export interface LayerSpec {
  seed: string
  size: number
  compression: 'gzip' | 'zstd' | null
}

async function compress(tar: Buffer, compression: LayerSpec['compression']): Promise<Buffer> {
  if (compression === null) return tar
  if (compression === 'gzip') return gzipSync(tar)
  const chunks: Buffer[] = []
  await pipeline(Readable.from([tar]), compressStream('zstd'), new Writable({ write(c: Buffer, _e, cb) { chunks.push(c); cb() } }))
  return Buffer.concat(chunks)
}

/** Builds an OCI image from layer specs (the same spec always gives the same blob). */
export async function buildImage(specs: LayerSpec[], platform: Platform = { os: 'linux', architecture: 'amd64' }, label = ''): Promise<RandomImage> {
  const blobs = new Map<Digest, Buffer>()
  const layers: RandomLayer[] = []
  for (const spec of specs) {
    const tar = makeLayer([{ name: `data/${spec.seed}.bin`, content: randomBytesFrom(7, spec.seed, spec.size) }])
    const blob = await compress(tar, spec.compression)
    const digest = digestOf(blob)
    blobs.set(digest, blob)
    layers.push({ digest, diffID: digestOf(tar), size: blob.length, mediaType: layerMediaType(MediaType.ociLayer, spec.compression, 'oci') })
  }
  const config = Buffer.from(JSON.stringify({
    created: '1970-01-01T00:00:00Z', architecture: platform.architecture, os: platform.os,
    config: { Labels: { label } }, rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffID) },
  }))
  const configDigest = digestOf(config)
  blobs.set(configDigest, config)
  const manifest: ImageManifest = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: configDigest, size: config.length },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
  }
  const bytes = Buffer.from(JSON.stringify(manifest))
  return { manifestDigest: digestOf(bytes), manifest: bytes, mediaType: MediaType.ociManifest, configDigest, config, layers, platform, blobs }
}

/**
 * The standard set: four images over shared layers, `scale` times 1 MiB-ish each. Image 0 is
 * uncompressed (a `compress` cache makes variants of it), 1 gzip, 2 zstd, 3 mixed; 0, 1 and 3
 * share a base layer, 1 and 3 a gzip layer.
 */
export async function standardImages(scale = 1): Promise<RandomImage[]> {
  const kb = (n: number) => Math.round(n * 1024 * scale)
  const base: LayerSpec = { seed: 'base', size: kb(900), compression: null }
  const shared: LayerSpec = { seed: 'shared', size: kb(700), compression: 'gzip' }
  return Promise.all([
    buildImage([base, { seed: 'own-0', size: kb(1200), compression: null }], undefined, 'img-0'),
    buildImage([base, shared, { seed: 'own-1', size: kb(500), compression: 'gzip' }], undefined, 'img-1'),
    buildImage([{ seed: 'own-2a', size: kb(800), compression: 'zstd' }, { seed: 'own-2b', size: kb(300), compression: 'zstd' }], undefined, 'img-2'),
    buildImage([shared, base, { seed: 'own-3', size: kb(600), compression: 'zstd' }], undefined, 'img-3'),
  ])
}

/** Writes `images` into the `oci:` layout `dir` as tags `img-<i>`. */
export async function writeSourceLayout(dir: string, images: RandomImage[]): Promise<void> {
  for (const [i, im] of images.entries()) await writeImageTo(new OciLayoutReference(dir, `img-${i}`), im)
}

/** Writes one image through any destination (blobs, manifest, commit). */
export async function writeImageTo(ref: ImageReference, im: RandomImage): Promise<void> {
  const dest = await ref.newImageDestination()
  try {
    await putRandomImage(dest, im)
    await dest.commit()
  } finally {
    await dest.close()
  }
}

/** Writes an OCI archive of `im` whose index names it `name` (io.containerd.image.name); resolves its path. */
export async function writeArchive(file: string, im: RandomImage, name: string): Promise<string> {
  await writeFile(file, tarOf(ociArchiveFiles(imageBlobs(im), [{
    mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length,
    annotations: { 'io.containerd.image.name': name },
  }])))
  return file
}

/** The directory paths of a fixture root. */
export function fixturePaths(root: string) {
  return {
    src: join(root, 'src'),
    cache: join(root, 'blob-cache'),
    dest: join(root, 'dest'),
    imageCache: join(root, 'image-cache'),
    archive: (i: number, tag = '') => join(root, `img-${i}${tag}.tar`),
  }
}

/**
 * Replaces the value at a path of a JSON document with `value`, copying what it changes (the
 * path picks keys modulo their count, so any path of numbers lands somewhere).
 */
export function mutate(doc: unknown, path: number[], value: unknown): unknown {
  if (path.length === 0 || typeof doc !== 'object' || doc === null) return value
  const keys = Object.keys(doc)
  if (keys.length === 0) return value
  const k = keys[path[0] % keys.length]
  const copy: Record<string, unknown> = Array.isArray(doc) ? ([...doc] as unknown as Record<string, unknown>) : { ...(doc as Record<string, unknown>) }
  copy[k] = mutate(copy[k], path.slice(1), value)
  return copy
}
