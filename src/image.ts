import debug from 'debug'
import type { Readable } from 'node:stream'
import { type Digest, digestAlgorithm, digestOf, parseDigest } from './digest.js'
import { DigestMismatchError, ImageError } from './errors.js'
import { type Descriptor, type ImageManifest, type ParsedManifest, parseManifest } from './manifest.js'
import type { BlobInfo, CallOptions, ImageSource } from './types.js'

const log = debug('blobcache:image')

/** Largest config blob {@link readConfig} accepts (16 MiB; real configs are a few KiB). */
export const MAX_CONFIG_SIZE = 16 << 20

/** A manifest read from a source: the parsed document plus the exact bytes and their digest. */
export type SourceManifest = ParsedManifest & {
  /** The bytes as the source returned them. */
  bytes: Buffer
  /** sha256 of `bytes` (or, for an instance, the digest it was asked for, which the bytes match). */
  digest: Digest
}

/**
 * Reads and parses the top-level manifest of `src`, or with `instanceDigest` one instance of a
 * list. An instance's bytes MUST hash to `instanceDigest` (else `DIGEST_INVALID`); a manifest
 * that does not parse fails `MANIFEST_INVALID` or `UNSUPPORTED` (see {@link parseManifest}).
 */
export async function readManifest(src: ImageSource, instanceDigest?: Digest, opts: CallOptions = {}): Promise<SourceManifest> {
  opts.signal?.throwIfAborted()
  const { bytes, mediaType } = await src.getManifest(instanceDigest, opts)
  let digest = digestOf(bytes)
  if (instanceDigest) {
    const actual = digestOf(bytes, digestAlgorithm(parseDigest(instanceDigest)))
    if (actual !== instanceDigest) throw new DigestMismatchError(instanceDigest, actual)
    digest = instanceDigest
  }
  const parsed = parseManifest(bytes, mediaType)
  log('manifest %s: %s, %d bytes', digest, parsed.mediaType, bytes.length)
  return { ...parsed, bytes, digest }
}

/** The layers of an image manifest as {@link BlobInfo}s, in order. */
export function manifestLayerInfos(manifest: ImageManifest): BlobInfo[] {
  return manifest.layers.map(descriptorInfo)
}

/** A descriptor as a {@link BlobInfo} (digest, size, media type, annotations, urls). */
export function descriptorInfo(d: Descriptor): BlobInfo {
  const info: BlobInfo = { digest: d.digest, size: d.size, mediaType: d.mediaType }
  if (d.annotations) info.annotations = d.annotations
  if (d.urls) info.urls = d.urls
  return info
}

/**
 * Reads a whole blob of at most `limit` bytes into memory, verifying its digest and size.
 * For small JSON only (configs); layers MUST be streamed.
 */
export async function readBlob(src: ImageSource, info: BlobInfo & { digest: Digest }, limit: number, opts: CallOptions = {}): Promise<Buffer> {
  if (info.size > limit) throw new ImageError('SIZE_INVALID', `blob ${info.digest}: ${info.size} bytes is larger than ${limit}`)
  opts.signal?.throwIfAborted()
  const { stream } = await src.getBlob(info, opts)
  const data = await collect(stream, limit, info.digest, opts.signal)
  if (info.size >= 0 && data.length !== info.size) {
    throw new ImageError('SIZE_INVALID', `blob ${info.digest}: got ${data.length} bytes, expected ${info.size}`)
  }
  const actual = digestOf(data, digestAlgorithm(info.digest))
  if (actual !== info.digest) throw new DigestMismatchError(info.digest, actual)
  return data
}

/**
 * Reads the config blob of an image manifest, verified against the descriptor's digest and
 * size. Fails `SIZE_INVALID` for a config larger than {@link MAX_CONFIG_SIZE}.
 */
export async function readConfig(src: ImageSource, manifest: ImageManifest, opts: CallOptions = {}): Promise<Buffer> {
  return readBlob(src, descriptorInfo(manifest.config) as BlobInfo & { digest: Digest }, MAX_CONFIG_SIZE, opts)
}

async function collect(stream: Readable, limit: number, what: string, signal?: AbortSignal): Promise<Buffer> {
  const chunks: Buffer[] = []
  let total = 0
  const onAbort = () => stream.destroy(signal?.reason)
  signal?.addEventListener('abort', onAbort, { once: true })
  try {
    for await (const chunk of stream) {
      const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array)
      total += buf.length
      if (total > limit) throw new ImageError('SIZE_INVALID', `blob ${what}: larger than ${limit} bytes`)
      chunks.push(buf)
    }
  } catch (err) {
    if (signal?.aborted) throw signal.reason
    throw err
  } finally {
    signal?.removeEventListener('abort', onAbort)
    stream.destroy()
  }
  return Buffer.concat(chunks, total)
}
