// Layer substitution (ImageSource.layerInfosForCopy): where the cache holds another form of a
// layer (its decompressed form, or a compressed variant), the copy may use that instead. The
// rules follow containers/image's newest blobcache, and the substitute's media type always
// describes its bytes.
import { join } from 'node:path'
import { MediaType } from '../media-types.js'
import type { Digest } from '../digest.js'
import type { BlobInfo, CompressionAlgorithm, LayerCompression } from '../types.js'
import { fileSize } from './files.js'
import { knownVariants, readCompressedNote, readDecompressedNote } from './notes.js'

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
  dir: string,
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
  if (mode === 'compress') {
    if (docker && algorithm !== 'gzip') return undefined
    const note = await readCompressedNote(dir, digest)
    const candidates = knownVariants(note)
      .filter(([, alg]) => alg === algorithm)
      .sort(([a], [b]) => (a < b ? -1 : 1))
    for (const [variant] of candidates) {
      const size = await fileSize(join(dir, variant))
      if (size === undefined) continue
      if ((await readDecompressedNote(dir, variant)) !== digest) continue
      const out: BlobInfo = { ...info, digest: variant, size, compressionOperation: 'compress', compressionAlgorithm: algorithm }
      out.mediaType = docker ? MediaType.dockerLayerGzip : algorithm === 'gzip' ? MediaType.ociLayerGzip : MediaType.ociLayerZstd
      return out
    }
    return undefined
  }
  if (docker) return undefined
  const uncompressed: Digest | undefined = await readDecompressedNote(dir, digest)
  if (!uncompressed) return undefined
  if (diffID !== undefined ? uncompressed !== diffID : !(await readCompressedNote(dir, uncompressed)).has(digest)) return undefined
  const size = await fileSize(join(dir, uncompressed))
  if (size === undefined) return undefined
  const { compressionAlgorithm: _dropped, annotations, ...rest } = info
  const out: BlobInfo = { ...rest, digest: uncompressed, size, mediaType: MediaType.ociLayer, compressionOperation: 'decompress' }
  if (annotations) {
    const kept = Object.fromEntries(Object.entries(annotations).filter(([k]) => !CHUNKED_ANNOTATIONS.includes(k)))
    if (Object.keys(kept).length > 0) out.annotations = kept
  }
  return out
}
