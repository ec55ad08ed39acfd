// Public exports of the image cache.
export {
  ImageCache, type ImageCacheOptions, type CacheCallOptions, type PullOptions, type ImageCacheEntry, type CachePushOptions,
} from './cache.js'
export { CachedImage, type ExportOptions, IN_TOTO_MEDIA_TYPE, PREDICATE_TYPE, SPDX_PREDICATE } from './source.js'
export {
  ContentStore, ContentWriter, AlreadyExistsError, type ContentInfo, type IngestStatus, type WriterOptions,
} from './store.js'
export type { GcOptions, GcReport } from './gc.js'
export type { PushResult } from './push.js'
export type { RemoteOptions } from './remote.js'
export type { PlatformLike } from './platforms.js'
export { cacheKey, cacheName, type CacheName, REF_NAME, CONTAINERD_NAME } from './names.js'
export { withFileLock, type FileLockOptions } from '../file-lock.js'
export { readTarStream, type StreamEntry } from './tar-stream.js'
export { LOCK_FILE as INDEX_LOCK_FILE } from './index-file.js'
