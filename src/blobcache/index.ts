// The blob cache: a containers/image-compatible, content-addressed cache around any image
// reference. Public exports only.
export { BlobCache, cacheLookupReferenceFunc, type BlobCacheOptions, type FlushOptions } from './reference.js'
export { BlobCacheSource } from './source.js'
export { BlobCacheDestination } from './destination.js'
export {
  CacheDirectory,
  type CacheEntry,
  type FoundBlob,
  type PruneOptions,
  type PruneResult,
  type VerifyResult,
} from './directory.js'
export type { CacheStats } from './stats.js'
export type { EntryKind } from './files.js'
export { formatCompressedNote, parseCompressedNote } from './notes.js'
export { SharedTier, type FlushProgress, type SharedStats, type SharedTierOptions } from './shared/tier.js'
export {
  ANNOTATION,
  ARTIFACT_TYPE,
  BLOB_MEDIA_TYPE,
  entryTag,
  formatEntryManifest,
  parseEntryManifest,
  type SharedEntry,
  type SharedKind,
} from './shared/format.js'
