// Layer substitution (ImageSource.layerInfosForCopy): where the cache holds another form of a
// layer (its decompressed form, or a compressed variant), the copy may use that instead. The
// rules follow containers/image's newest blobcache, and the substitute's media type always
// describes its bytes. The notes and sizes are read through a view: the cache directory alone,
// or the directory first and then a shared tier's entries.
import { join } from 'node:path'
import { MediaType } from '../media-types.js'
import type { Digest } from '../digest.js'
import type { BlobInfo, CompressionAlgorithm, LayerCompression } from '../types.js'
import { fileSize } from './files.js'
import { readCompressedNote, readDecompressedNote } from './notes.js'
import type { SharedEntry } from './shared/format.js'

/** Annotations that describe a zstd:chunked (or eStargz) layer; meaningless once decompressed. */
export const CHUNKED_ANNOTATIONS: readonly string[] = [
  'io.github.containers.zstd-chunked.manifest-checksum',
  'io.github.containers.zstd-chunked.manifest-position',
  'io.github.containers.zstd-chunked.tarsplit-position',
  'io.github.containers.zstd-chunked.tarsplit-checksum',
  'containerd.io/snapshot/stargz/toc.digest',
]

const OCI_LAYERS: readonly string[] = [MediaType.ociLayer, MediaType.ociLayerGzip, MediaType.ociLayerZstd]
const DOCKER_LAYERS: readonly string[] = [MediaType.dockerLayer, MediaType.dockerLayerGzip, MediaType.dockerLayerZstd]

/**
 * What substitution knows of the cache: the notes and the sizes of entries. Every method MAY
 * reject (the caller logs and keeps the layer).
 */
export interface SubstitutionView {
  /**
   * The compressed variants of `uncompressed` with their algorithm names, preferred ones first
   * (the order in which substitution tries them). Iterated lazily: a view SHOULD look further
   * (ask a slower source) only when the caller reads past what it has found so far.
   */
  compressedVariants(uncompressed: Digest): AsyncIterable<[Digest, string]>
  /** The decompressed form of `compressed`, or undefined when nothing names one. */
  decompressedOf(compressed: Digest): Promise<Digest | undefined>
  /** The size of the blob `digest` where the cache can supply it, or undefined when it cannot. */
  sizeOf(digest: Digest): Promise<number | undefined>
}

/**
 * The view of a cache directory alone: its note files, and the sizes of its regular files.
 * Variants are tried in digest order.
 */
export function localView(dir: string): SubstitutionView {
  return {
    async *compressedVariants(u) {
      yield* sortedVariants(await readCompressedNote(dir, u))
    },
    decompressedOf: (c) => readDecompressedNote(dir, c),
    sizeOf: (d) => fileSize(join(dir, d)),
  }
}

/** The entries of a note, in digest order. */
function sortedVariants(note: Map<Digest, string>): [Digest, string][] {
  return [...note].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
}

/** The part of a shared tier that substitution reads: its entries. */
export interface SharedLookup {
  /** The tier's entry for `digest`, or undefined (absent, or the tier unusable). MUST NOT reject except on abort. */
  lookup(digest: Digest, signal?: AbortSignal): Promise<SharedEntry | undefined>
}

/**
 * The view of a cache directory backed by a shared tier: local first, then the tier.
 *
 * - Compressed variants: those of the local note (digest order), then those only the tier's
 *   entry of the uncompressed blob lists (digest order).
 * - Decompressed form: the local note, else the tier's entry of the compressed blob.
 * - Size: the local file's, else the size in the blob's OWN tier entry (so the tier holds it).
 *
 * Each question asks the tier only when the directory has no (further) answer.
 */
export function tieredView(dir: string, tier: SharedLookup, signal?: AbortSignal): SubstitutionView {
  const local = localView(dir)
  return {
    async *compressedVariants(u) {
      const seen = new Set<Digest>()
      for await (const variant of local.compressedVariants(u)) {
        seen.add(variant[0])
        yield variant
      }
      const entry = await tier.lookup(u, signal)
      if (entry) yield* sortedVariants(entry.compressed).filter(([d]) => !seen.has(d))
    },
    async decompressedOf(c) {
      return (await local.decompressedOf(c)) ?? (await tier.lookup(c, signal))?.decompressed
    },
    async sizeOf(d) {
      return (await local.sizeOf(d)) ?? (await tier.lookup(d, signal))?.size
    },
  }
}

/**
 * The substitute for one layer, or undefined to keep it.
 *
 * - `compress`: the `algorithm` variant named in `<digest>.compressed` whose file is cached;
 *   OCI layers become `tar+gzip`/`tar+zstd`, Docker schema 2 layers `diff.tar.gzip` (Docker
 *   cannot describe zstd, so a zstd request keeps Docker layers).
 * - `decompress`: the entry named in `<digest>.decompressed`, for OCI layers only (`tar`, with
 *   the zstd:chunked annotations removed); Docker schema 2 layers are kept.
 * - Other media types (foreign, non-distributable, artifacts) are always kept, as is everything
 *   in `preserve` mode.
 *
 * `cache` is the cache directory (its notes and files) or a {@link SubstitutionView} over it.
 * The substitute carries `compressionOperation` and `compressionAlgorithm`, so that a copy
 * rewrites the manifest. Errors reading the notes reject; the caller decides.
 *
 * Notes are hints that may be stale, foreign or damaged, and a wrong substitute would silently
 * change the image: a variant is taken only when the notes agree in both directions (the
 * variant's `.decompressed` names the layer; the decompressed form's `.compressed` lists the
 * layer), and with `diffID` (the layer's entry in the config's rootfs.diff_ids) a decompressed
 * form MUST be exactly that digest.
 */
export async function substituteLayer(
  cache: string | SubstitutionView,
  info: BlobInfo,
  mode: LayerCompression,
  algorithm: CompressionAlgorithm,
  diffID?: Digest,
): Promise<BlobInfo | undefined> {
  const digest = info.digest
  const mediaType = info.mediaType ?? ''
  if (!digest || mode === 'preserve') return undefined
  const oci = OCI_LAYERS.includes(mediaType)
  const docker = DOCKER_LAYERS.includes(mediaType)
  if (!oci && !docker) return undefined
  const view = typeof cache === 'string' ? localView(cache) : cache
  if (mode === 'compress') {
    if (docker && algorithm !== 'gzip') return undefined
    const tried = new Set<Digest>()
    for await (const [variant, alg] of view.compressedVariants(digest)) {
      if (alg !== algorithm || tried.has(variant)) continue
      tried.add(variant)
      const size = await view.sizeOf(variant)
      if (size === undefined) continue
      if ((await view.decompressedOf(variant)) !== digest) continue
      const out: BlobInfo = { ...info, digest: variant, size, compressionOperation: 'compress', compressionAlgorithm: algorithm }
      out.mediaType = docker ? MediaType.dockerLayerGzip : algorithm === 'gzip' ? MediaType.ociLayerGzip : MediaType.ociLayerZstd
      return out
    }
    return undefined
  }
  if (docker) return undefined
  const uncompressed: Digest | undefined = await view.decompressedOf(digest)
  if (!uncompressed) return undefined
  if (diffID !== undefined ? uncompressed !== diffID : !(await listsVariant(view, uncompressed, digest))) return undefined
  const size = await view.sizeOf(uncompressed)
  if (size === undefined) return undefined
  const { compressionAlgorithm: _dropped, annotations, ...rest } = info
  const out: BlobInfo = { ...rest, digest: uncompressed, size, mediaType: MediaType.ociLayer, compressionOperation: 'decompress' }
  if (annotations) {
    const kept = Object.fromEntries(Object.entries(annotations).filter(([k]) => !CHUNKED_ANNOTATIONS.includes(k)))
    if (Object.keys(kept).length > 0) out.annotations = kept
  }
  return out
}

/** True when the view lists `variant` among the compressed variants of `uncompressed`. */
async function listsVariant(view: SubstitutionView, uncompressed: Digest, variant: Digest): Promise<boolean> {
  for await (const [d] of view.compressedVariants(uncompressed)) if (d === variant) return true
  return false
}
