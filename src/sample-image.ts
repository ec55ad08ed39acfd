// A small, deterministic sample image for the demo: three gzip tar layers and a config,
// written through any transport's ImageDestination.
import { Readable, Writable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { type Digest, digestOf } from './digest.js'
import { type Descriptor, type ImageManifest, currentPlatform, serializeManifest } from './manifest.js'
import { MediaType } from './media-types.js'
import { type TarWriteEntry, writeTar } from './tar.js'
import type { CallOptions, ImageReference, SystemContext } from './types.js'

/** What {@link writeSampleImage} wrote. */
export interface SampleImage {
  manifest: Buffer
  digest: Digest
  config: Descriptor
  layers: Descriptor[]
}

type SampleFile = { path: string; data: string | Buffer; mode?: number } | { path: string; dir: true }

const MTIME = Date.UTC(2024, 0, 1) / 1000

/** The files of each layer: a base, an application and some data. */
function sampleLayers(): SampleFile[][] {
  const lines = Array.from({ length: 200 }, (_, i) => `line ${i}: the quick brown fox jumps over the lazy dog`)
  return [
    [
      { path: 'etc', dir: true },
      { path: 'etc/os-release', data: 'NAME="blobcache sample"\nID=sample\nVERSION_ID=1\n' },
      { path: 'etc/motd', data: 'Copied by blobcache.\n' },
    ],
    [
      { path: 'app', dir: true },
      { path: 'app/hello.sh', data: '#!/bin/sh\necho "hello from the blobcache sample image"\n', mode: 0o755 },
    ],
    [
      { path: 'srv', dir: true },
      { path: 'srv/data.txt', data: lines.join('\n') + '\n' },
    ],
  ]
}

/** Builds an uncompressed tar of `files` in memory (they are a few KiB). */
async function tarOf(files: SampleFile[]): Promise<Buffer> {
  const chunks: Buffer[] = []
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk)
      cb()
    },
  })
  const entries: TarWriteEntry[] = files.map((f) => {
    if ('dir' in f) return { type: 'dir', path: f.path, mtime: MTIME }
    const data = Buffer.from(f.data)
    return { path: f.path, size: data.length, mode: f.mode ?? 0o644, mtime: MTIME, open: () => Readable.from([data]) }
  })
  await writeTar(entries, sink)
  return Buffer.concat(chunks)
}

/**
 * Writes the sample image to `ref` (for example `oci:/tmp/x:latest`) through its destination:
 * three gzip layers, an OCI config for this machine's architecture and an OCI manifest.
 */
export async function writeSampleImage(ref: ImageReference, opts: CallOptions & { ctx?: SystemContext } = {}): Promise<SampleImage> {
  const { signal } = opts
  const tars = await Promise.all(sampleLayers().map(tarOf))
  const blobs = tars.map((tar) => gzipSync(tar, { level: 6 }))
  const layers: Descriptor[] = blobs.map((b) => ({ mediaType: MediaType.ociLayerGzip, digest: digestOf(b), size: b.length }))
  const { architecture, variant } = currentPlatform()
  const created = new Date(MTIME * 1000).toISOString().replace('.000Z', 'Z')
  const configBytes = Buffer.from(
    JSON.stringify({
      created,
      architecture,
      ...(variant ? { variant } : {}),
      os: 'linux',
      config: {
        Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
        Cmd: ['/app/hello.sh'],
        Labels: { 'org.opencontainers.image.title': 'blobcache sample' },
      },
      rootfs: { type: 'layers', diff_ids: tars.map((t) => digestOf(t)) },
      history: tars.map((_, i) => ({ created, created_by: `blobcache sample layer ${i + 1}` })),
    }),
  )
  const config: Descriptor = { mediaType: MediaType.ociConfig, digest: digestOf(configBytes), size: configBytes.length }
  const manifest: ImageManifest = { schemaVersion: 2, mediaType: MediaType.ociManifest, config, layers }
  const manifestBytes = serializeManifest(manifest)

  const dest = await ref.newImageDestination({ ...opts.ctx, signal })
  try {
    for (const [i, blob] of blobs.entries()) {
      const { digest, size, mediaType } = layers[i]
      await dest.putBlob(Readable.from([blob]), { digest, size, mediaType }, { signal })
    }
    await dest.putBlob(Readable.from([configBytes]), { digest: config.digest, size: config.size, mediaType: config.mediaType }, { isConfig: true, signal })
    await dest.putManifest(manifestBytes, undefined, { signal })
    await dest.commit({ signal })
  } finally {
    await dest.close()
  }
  return { manifest: manifestBytes, digest: digestOf(manifestBytes), config, layers }
}
