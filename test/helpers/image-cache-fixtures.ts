// Fixtures for the image-cache tests: random images and indexes written straight into a cache
// directory (or pushed to a registry), buildkit-style attestations, and OCI tars built in
// memory with the test tar writer (never with the code under test).
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { type Digest, digestHex, digestOf } from '../../src/digest.js'
import type { Descriptor, ImageIndex, Platform } from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { type LayerFile, makeLayer } from './make-layer.js'
import { type RandomImage, buildRandomImage } from './random-image.js'

export const AMD64: Platform = { os: 'linux', architecture: 'amd64' }
export const ARM64: Platform = { os: 'linux', architecture: 'arm64' }

/** Writes one blob into a layout directory (no verification: fixtures only). */
export async function putBlob(dir: string, bytes: Buffer): Promise<Digest> {
  const digest = digestOf(bytes)
  await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true })
  await writeFile(join(dir, 'blobs', 'sha256', digestHex(digest)), bytes)
  return digest
}

/** Writes an image's blobs and manifest; resolves its descriptor (with its platform). */
export async function putImage(dir: string, image: RandomImage, withPlatform = true): Promise<Descriptor> {
  for (const [, bytes] of image.blobs) await putBlob(dir, bytes)
  await putBlob(dir, image.manifest)
  const d: Descriptor = { mediaType: image.mediaType, digest: image.manifestDigest, size: image.manifest.length }
  if (withPlatform) d.platform = image.platform
  return d
}

/** A random image for a platform. */
export function image(platform: Platform, seed = 1, layers = 2): Promise<RandomImage> {
  return buildRandomImage({ platform, seed, layers })
}

/** An index over descriptors, as bytes and descriptor (blob written to `dir`). */
export async function putIndex(dir: string, manifests: Descriptor[], mediaType: string = MediaType.ociIndex): Promise<{ descriptor: Descriptor; index: ImageIndex; bytes: Buffer }> {
  const index: ImageIndex = { schemaVersion: 2, mediaType, manifests }
  const bytes = Buffer.from(JSON.stringify(index))
  const digest = await putBlob(dir, bytes)
  return { descriptor: { mediaType, digest, size: bytes.length }, index, bytes }
}

/** A buildkit-style SBOM attestation for the image `of`; its blobs in `blobs`. */
export function attestation(of: Digest, spdx: Record<string, unknown>): { manifest: Buffer; descriptor: Descriptor; blobs: Buffer[] } {
  const statement = Buffer.from(JSON.stringify({
    _type: 'https://in-toto.io/Statement/v0.1',
    predicateType: 'https://spdx.dev/Document',
    subject: [{ name: 'pkg:docker/x', digest: { sha256: digestHex(of) } }],
    predicate: spdx,
  }))
  const config = Buffer.from(JSON.stringify({ architecture: 'unknown', os: 'unknown', config: {}, rootfs: { type: 'layers', diff_ids: [digestOf(statement)] } }))
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: [{
      mediaType: 'application/vnd.in-toto+json', digest: digestOf(statement), size: statement.length,
      annotations: { 'in-toto.io/predicate-type': 'https://spdx.dev/Document' },
    }],
  }))
  const descriptor: Descriptor = {
    mediaType: MediaType.ociManifest, digest: digestOf(manifest), size: manifest.length,
    platform: { os: 'unknown', architecture: 'unknown' },
    annotations: { 'vnd.docker.reference.digest': of, 'vnd.docker.reference.type': 'attestation-manifest' },
  }
  return { manifest, descriptor, blobs: [config, statement] }
}

/** An image whose two gzip layers exercise whiteouts: layer 2 deletes `a`, makes `d` opaque and replaces `e` (a dir) with a file. */
export function whiteoutImage(): { layers: Buffer[]; config: Buffer; manifest: Buffer; digest: Digest } {
  const l1: LayerFile[] = [
    { name: 'a', content: 'a1' }, { name: 'b', content: 'b1' },
    { name: 'd', type: 'dir' }, { name: 'd/x', content: 'x1' },
    { name: 'e', type: 'dir' }, { name: 'e/inner', content: 'i1' },
    { name: 'f', type: 'dir' }, { name: 'f/keep', content: 'k1' }, { name: 'f/gone', content: 'g1' },
  ]
  const l2: LayerFile[] = [
    { name: '.wh.a' }, { name: 'b', content: 'b2' },
    { name: 'd', type: 'dir' }, { name: 'd/.wh..wh..opq' }, { name: 'd/y', content: 'y2' },
    { name: 'e', content: 'now a file' },
    { name: 'f/.wh.gone' },
  ]
  const tars = [makeLayer(l1), makeLayer(l2)]
  const layers = tars.map((t) => gzipSync(t))
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: tars.map((t) => digestOf(t)) } }))
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2, mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: digestOf(config), size: config.length },
    layers: layers.map((l) => ({ mediaType: MediaType.ociLayerGzip, digest: digestOf(l), size: l.length })),
  }))
  return { layers, config, manifest, digest: digestOf(manifest) }
}

/** Builds a tar in memory from named byte strings (paths up to 100 bytes). */
export function tarOf(files: { path: string; data: Buffer | string }[]): Buffer {
  return makeLayer(files.map((f) => ({ name: f.path, content: f.data })))
}

/** The files of an OCI archive holding `images` (blobs and manifests) and an index.json of `entries`. */
export function ociArchiveFiles(blobs: Buffer[], entries: Descriptor[], prefix = ''): { path: string; data: Buffer | string }[] {
  const files: { path: string; data: Buffer | string }[] = [
    { path: `${prefix}oci-layout`, data: JSON.stringify({ imageLayoutVersion: '1.0.0' }) },
    { path: `${prefix}index.json`, data: JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: entries }) },
  ]
  const seen = new Set<string>()
  for (const b of blobs) {
    const hex = digestHex(digestOf(b))
    if (seen.has(hex)) continue
    seen.add(hex)
    files.push({ path: `${prefix}blobs/sha256/${hex}`, data: b })
  }
  return files
}

/** Every blob of a random image, manifest included. */
export function imageBlobs(im: RandomImage): Buffer[] {
  return [...im.blobs.values(), im.manifest]
}
