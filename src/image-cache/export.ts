// Exports one image of the cache as a tar stream: an OCI image layout archive that imageLoad
// (ours, buildkit's, `docker load` 25+, skopeo's oci-archive) re-imports under its name, or a
// `docker load` archive (the same, plus manifest.json with RepoTags). Every blob is verified as
// it is written; an error mid-way errors the stream the reader holds (linuxkit swallowed it).
import { PassThrough, type Readable } from 'node:stream'
import debug from 'debug'
import { digestAlgorithm, digestHex } from '../digest.js'
import type { Descriptor, ImageManifest } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { parseNormalizedNamed } from '../name.js'
import { type TarWriteEntry, writeTar } from '../tar.js'
import { CHUNK, openVerifiedBlob, readSmallBlob } from './blobs.js'
import { LAYOUT_CONTENT } from './index-file.js'
import { CONTAINERD_NAME, REF_NAME } from './names.js'

const log = debug('blobcache:image-cache:export')

/** One image to export: the descriptor of its (platform) manifest, and that manifest. */
export interface ExportedImage {
  /** The image manifest's descriptor (its own media type, never an index's). */
  descriptor: Descriptor
  manifest: ImageManifest
  /** The canonical name to record in the archive; none for an unnamed export. */
  name?: string
}

const archivePath = (d: Descriptor) => `blobs/${digestAlgorithm(d.digest)}/${digestHex(d.digest)}`

function blobEntry(dir: string, d: Descriptor, signal?: AbortSignal): TarWriteEntry {
  return {
    path: archivePath(d),
    size: d.size,
    mode: 0o444,
    open: async () => (await openVerifiedBlob(dir, d.digest, { size: d.size, signal })).stream,
  }
}

const bytesEntry = (path: string, data: Buffer | string): TarWriteEntry => {
  const buf = Buffer.isBuffer(data) ? data : Buffer.from(data)
  return { path, size: buf.length, open: () => PassThroughOf(buf) }
}

function PassThroughOf(buf: Buffer): Readable {
  const p = new PassThrough()
  p.end(buf)
  return p
}

/** The archive's index.json: one entry, the image manifest, named for containerd and OCI tools. */
function archiveIndex(image: ExportedImage): Buffer {
  const entry: Descriptor = { mediaType: image.descriptor.mediaType, digest: image.descriptor.digest, size: image.descriptor.size }
  if (image.descriptor.platform) entry.platform = image.descriptor.platform
  if (image.name) entry.annotations = { [CONTAINERD_NAME]: image.name, [REF_NAME]: image.name }
  return Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [entry] }))
}

/** The entries of an OCI archive of `image`, in the order they are written. */
async function* ociEntries(dir: string, image: ExportedImage, signal?: AbortSignal): AsyncGenerator<TarWriteEntry> {
  yield bytesEntry('oci-layout', LAYOUT_CONTENT)
  yield bytesEntry('index.json', archiveIndex(image))
  const manifestBytes = await readSmallBlob(dir, image.descriptor.digest)
  yield bytesEntry(archivePath(image.descriptor), manifestBytes)
  yield blobEntry(dir, image.manifest.config, signal)
  const seen = new Set<string>([image.descriptor.digest, image.manifest.config.digest])
  for (const layer of image.manifest.layers) {
    if (seen.has(layer.digest)) continue
    seen.add(layer.digest)
    yield blobEntry(dir, layer, signal)
  }
}

/** `RepoTags` for manifest.json: the familiar tag form (`alpine:3.19`) docker save writes. */
function repoTags(name: string | undefined): string[] {
  if (!name) return []
  const ref = parseNormalizedNamed(name)
  if (ref.tag === undefined) return []
  const familiar = ref.familiar()
  return [ref.digest ? familiar.slice(0, familiar.indexOf('@')) : familiar]
}

/** Streams `entries` as a tar; a failure part-way destroys the returned stream with the error. */
function tarStream(entries: AsyncIterable<TarWriteEntry>, what: string, signal?: AbortSignal): Readable {
  const out = new PassThrough({ highWaterMark: CHUNK })
  writeTar(entries, out, { signal }).then(
    () => log('exported %s', what),
    (err: unknown) => {
      log('export of %s failed: %s', what, (err as Error).message)
      if (!out.destroyed) out.destroy(err as Error)
    },
  )
  return out
}

/**
 * An OCI image layout archive of one image: `oci-layout`, `index.json` with one entry (the
 * image manifest, its own media type, named by `io.containerd.image.name` and
 * `org.opencontainers.image.ref.name` with the full name), and the blobs.
 */
export function exportOciArchive(dir: string, image: ExportedImage, opts: { signal?: AbortSignal } = {}): Readable {
  return tarStream(ociEntries(dir, image, opts.signal), `${image.descriptor.digest} as OCI`, opts.signal)
}

/**
 * A `docker load` archive of one image: the OCI archive plus `manifest.json` naming the config,
 * the layers and `RepoTags` (the familiar form of `name`). Layers are stored as they are in the
 * cache (docker load decompresses them).
 */
export function exportDockerArchive(dir: string, image: ExportedImage, opts: { signal?: AbortSignal } = {}): Readable {
  async function* entries(): AsyncGenerator<TarWriteEntry> {
    const manifestJson = [{
      Config: archivePath(image.manifest.config),
      RepoTags: repoTags(image.name),
      Layers: image.manifest.layers.map(archivePath),
    }]
    yield bytesEntry('manifest.json', JSON.stringify(manifestJson))
    yield* ociEntries(dir, image, opts.signal)
  }
  return tarStream(entries(), `${image.descriptor.digest} for docker load`, opts.signal)
}
