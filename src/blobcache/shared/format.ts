// The shared tier's on-registry format: each cached blob D is kept alive by a small OCI artifact
// manifest, tagged `sha256-<hex of D>`, whose single layer is D and whose annotations carry what
// the cache knows of D (its kind, its compression, its decompressed form, its compressed
// variants). The bytes are deterministic, so two writers with the same knowledge write the same
// manifest; the parser trusts nothing it cannot check.
import debug from 'debug'
import { type Digest, digestAlgorithm, digestHex, isDigest } from '../../digest.js'
import { ImageError } from '../../errors.js'
import type { DetectedAlgorithm } from '../../types.js'
import { isNoteAlgorithm } from '../notes.js'

const log = debug('blobcache:blobcache:shared:format')

/** The `artifactType` of every entry manifest. */
export const ARTIFACT_TYPE = 'application/vnd.blobcache.entry.v1'

/** The media type of the entry's single layer: the cached blob itself. */
export const BLOB_MEDIA_TYPE = 'application/vnd.blobcache.blob.v1'

/** The media type of entry manifests (OCI image manifest 1.1). */
export const ENTRY_MANIFEST_MEDIA_TYPE = 'application/vnd.oci.image.manifest.v1+json'

/** The annotation keys of an entry manifest. */
export const ANNOTATION = {
  kind: 'dev.blobcache.kind',
  compression: 'dev.blobcache.compression',
  decompressed: 'dev.blobcache.decompressed',
  compressed: 'dev.blobcache.compressed',
} as const

/** The OCI empty descriptor used as every entry's config; the blob `{}` MUST exist in the repository. */
export const EMPTY_CONFIG = {
  mediaType: 'application/vnd.oci.empty.v1+json',
  digest: 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a' as Digest,
  size: 2,
  data: 'e30=',
} as const

/** The bytes of the empty config blob. */
export const EMPTY_CONFIG_BYTES = Buffer.from('{}')

/** Largest entry manifest {@link parseEntryManifest} accepts. */
export const MAX_ENTRY_SIZE = 256 << 10

/** What a cached blob is: an image layer, an image config, or a manifest. */
export type SharedKind = 'layer' | 'config' | 'manifest'

const KINDS: readonly SharedKind[] = ['layer', 'config', 'manifest']

/** What the tier knows of one blob. */
export interface SharedEntry {
  digest: Digest
  size: number
  kind: SharedKind
  /** The blob itself is compressed with this algorithm. */
  compression?: DetectedAlgorithm
  /** The digest of the blob's decompressed form. */
  decompressed?: Digest
  /** The blob's compressed variants: digest -> algorithm name. */
  compressed: Map<Digest, string>
}

/** An algorithm name as it may appear in a `compressed` annotation line. */
const ALGORITHM_NAME = /^[a-z0-9][a-z0-9._+-]{0,31}$/

/**
 * The tag of the entry of `digest`: `sha256-<hex>`, or undefined when the digest cannot be a
 * tag (a sha512 digest gives 135 characters, more than the 128 a tag may hold).
 */
export function entryTag(digest: Digest): string | undefined {
  if (!isDigest(digest) || digestAlgorithm(digest) !== 'sha256') return undefined
  return `sha256-${digestHex(digest)}`
}

function byKey<T>([a]: [string, T], [b]: [string, T]): number {
  return a < b ? -1 : a > b ? 1 : 0
}

/** The `compressed` annotation value: one `<digest> <algorithm>` a line, sorted by digest. */
function formatVariants(variants: Map<Digest, string>): string {
  return [...variants].sort(byKey).map(([d, alg]) => `${d} ${alg}`).join('\n')
}

/**
 * Serializes an entry as its manifest. The bytes MUST depend only on the entry's content: keys in
 * a fixed order, annotations sorted by key, variants sorted by digest, no whitespace and no
 * timestamps, so that writers with the same knowledge produce identical manifests. Throws
 * `MANIFEST_INVALID` for an entry that cannot be written (bad digest or size).
 */
export function formatEntryManifest(e: SharedEntry): Buffer {
  if (!isDigest(e.digest)) throw new ImageError('MANIFEST_INVALID', `shared entry: invalid digest ${JSON.stringify(e.digest)}`)
  if (!Number.isSafeInteger(e.size) || e.size < 0) throw new ImageError('MANIFEST_INVALID', `shared entry ${e.digest}: invalid size ${e.size}`)
  if (!KINDS.includes(e.kind)) throw new ImageError('MANIFEST_INVALID', `shared entry ${e.digest}: invalid kind ${JSON.stringify(e.kind)}`)
  const annotations: [string, string][] = [[ANNOTATION.kind, e.kind]]
  if (e.compression) annotations.push([ANNOTATION.compression, e.compression])
  if (e.decompressed && isDigest(e.decompressed) && e.decompressed !== e.digest) annotations.push([ANNOTATION.decompressed, e.decompressed])
  const variants = new Map([...e.compressed].filter(([d, alg]) => isDigest(d) && d !== e.digest && ALGORITHM_NAME.test(alg)))
  if (variants.size > 0) annotations.push([ANNOTATION.compressed, formatVariants(variants)])
  const manifest = {
    schemaVersion: 2,
    mediaType: ENTRY_MANIFEST_MEDIA_TYPE,
    artifactType: ARTIFACT_TYPE,
    config: { mediaType: EMPTY_CONFIG.mediaType, digest: EMPTY_CONFIG.digest, size: EMPTY_CONFIG.size, data: EMPTY_CONFIG.data },
    layers: [{ mediaType: BLOB_MEDIA_TYPE, digest: e.digest, size: e.size }],
    annotations: Object.fromEntries(annotations.sort(byKey)),
  }
  return Buffer.from(JSON.stringify(manifest), 'utf8')
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

/**
 * Parses the manifest of the entry of `digest`. Throws `MANIFEST_INVALID` when it is not this
 * tier's artifact for that digest: not a JSON object, another schema version, media type or
 * artifact type, a layer list whose first layer is not `digest` with media type
 * {@link BLOB_MEDIA_TYPE} and a valid size, or a missing or unknown kind. Annotation values
 * that do not hold (invalid digests, unknown compression names) are dropped, never trusted.
 */
export function parseEntryManifest(bytes: Buffer, digest: Digest): SharedEntry {
  const bad = (why: string): never => {
    throw new ImageError('MANIFEST_INVALID', `shared entry for ${digest}: ${why}`)
  }
  if (bytes.length > MAX_ENTRY_SIZE) bad(`larger than ${MAX_ENTRY_SIZE} bytes`)
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch {
    bad('not JSON')
  }
  if (!isObject(doc)) return bad('not a JSON object')
  if (doc.schemaVersion !== 2) bad('schemaVersion is not 2')
  if (doc.mediaType !== ENTRY_MANIFEST_MEDIA_TYPE) bad(`media type is ${JSON.stringify(doc.mediaType)}`)
  if (doc.artifactType !== ARTIFACT_TYPE) bad(`artifact type is ${JSON.stringify(doc.artifactType)}`)
  if (!isObject(doc.config)) bad('no config descriptor')
  const layers = doc.layers
  if (!Array.isArray(layers) || layers.length !== 1 || !isObject(layers[0])) return bad('it must have exactly one layer')
  const layer = layers[0]
  if (layer.mediaType !== BLOB_MEDIA_TYPE) bad(`layer media type is ${JSON.stringify(layer.mediaType)}`)
  if (layer.digest !== digest) bad(`its layer is ${JSON.stringify(layer.digest)}`)
  const size = layer.size
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) return bad(`invalid layer size ${JSON.stringify(size)}`)
  const annotations = isObject(doc.annotations) ? doc.annotations : {}
  const kind = annotations[ANNOTATION.kind]
  if (typeof kind !== 'string' || !(KINDS as readonly string[]).includes(kind)) return bad(`invalid kind ${JSON.stringify(kind)}`)
  const entry: SharedEntry = { digest, size, kind: kind as SharedKind, compressed: new Map() }
  const compression = annotations[ANNOTATION.compression]
  if (typeof compression === 'string' && isNoteAlgorithm(compression)) entry.compression = compression
  else if (compression !== undefined) log('entry %s: dropped compression %j', digest, compression)
  const decompressed = annotations[ANNOTATION.decompressed]
  if (isDigest(decompressed) && decompressed !== digest) entry.decompressed = decompressed
  else if (decompressed !== undefined) log('entry %s: dropped decompressed %j', digest, decompressed)
  const compressed = annotations[ANNOTATION.compressed]
  if (typeof compressed === 'string') {
    for (const raw of compressed.split('\n')) {
      const [d, alg, ...rest] = raw.trim().split(/\s+/)
      if (isDigest(d) && d !== digest && alg !== undefined && ALGORITHM_NAME.test(alg) && rest.length === 0) entry.compressed.set(d, alg)
      else if (raw.trim() !== '') log('entry %s: dropped variant line %j', digest, raw)
    }
  }
  return entry
}

/**
 * Merges two entries of one blob: `existing` (read from the tier) and `ours` (what a writer
 * knows). Compressed variants are united (an algorithm already recorded for a digest is kept);
 * `decompressed`, `kind` and `compression` keep the existing value and take ours only where the
 * existing one is missing (a differing `decompressed` is logged as a conflict: both are hashes
 * of a real decompression, so they cannot legitimately differ). The size is ours: a writer has
 * the blob's verified bytes in hand. Throws `MANIFEST_INVALID` for entries of different digests.
 */
export function mergeEntries(existing: SharedEntry, ours: SharedEntry): SharedEntry {
  if (existing.digest !== ours.digest) {
    throw new ImageError('MANIFEST_INVALID', `cannot merge the shared entries of ${existing.digest} and ${ours.digest}`)
  }
  if (existing.decompressed && ours.decompressed && existing.decompressed !== ours.decompressed) {
    log('conflict on %s: decompressed %s in the tier, %s here; keeping the tier', existing.digest, existing.decompressed, ours.decompressed)
  }
  const compressed = new Map(existing.compressed)
  for (const [d, alg] of ours.compressed) if (!compressed.has(d)) compressed.set(d, alg)
  const merged: SharedEntry = { digest: existing.digest, size: ours.size, kind: existing.kind ?? ours.kind, compressed }
  const compression = existing.compression ?? ours.compression
  if (compression) merged.compression = compression
  const decompressed = existing.decompressed ?? ours.decompressed
  if (decompressed) merged.decompressed = decompressed
  return merged
}

/**
 * True when `have` already holds every note of `want`, so that writing `want` would add
 * nothing: same digest and size, a compression and a decompressed form wherever `want` has one,
 * and every compressed variant of `want`. (`have`'s values win a merge, so their values need not
 * be equal; kinds are not compared, as a merge keeps the existing one.)
 */
export function entryCovers(have: SharedEntry, want: SharedEntry): boolean {
  if (have.digest !== want.digest || have.size !== want.size) return false
  if (want.compression && !have.compression) return false
  if (want.decompressed && !have.decompressed) return false
  for (const d of want.compressed.keys()) if (!have.compressed.has(d)) return false
  return true
}
