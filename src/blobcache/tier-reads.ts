// Reads of a BlobCache from its shared tier, for its source and destination: a blob fetched into
// the cache directory (verified as it is written), an instance manifest, and the substitutes
// only the tier holds, fetched before they are offered. None of them fails a read: a failure is
// reported to the caller's error handler and reads as "not in the tier".
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import debug from 'debug'
import { type Digest, digestAlgorithm, digestOf, parseDigest } from '../digest.js'
import { MAX_MANIFEST_SIZE } from '../manifest.js'
import { guessMediaType } from '../media-types.js'
import type { BlobInfo, CallOptions } from '../types.js'
import { READ_NOFOLLOW, fileSize } from './files.js'
import type { SharedTier } from './shared/tier.js'
import type { CacheErrorHandler } from './variants.js'

const log = debug('blobcache:blobcache:tier-reads')

/** Tier-only substitutes fetched into the directory at once by {@link prefetchSubstitutes}. */
const PREFETCH_CONCURRENCY = 4

/** A blob fetched from the shared tier into the cache directory (verified). */
export interface TierFetched {
  path: string
  name: string
  size: number
  isConfig: boolean
}

/**
 * The blob fetched from the tier into `dir` (verified, with `info.size` when that is known), or
 * undefined: no digest, not in the tier, or the tier failed (the tier counts and reports that).
 * Rejects only when aborted.
 */
export async function fetchFromTier(tier: SharedTier, dir: string, info: BlobInfo, opts: CallOptions, onError: CacheErrorHandler): Promise<TierFetched | undefined> {
  if (!info.digest) return undefined
  const digest = parseDigest(info.digest)
  try {
    const fetched = await tier.fetchInto(dir, digest, info.size, opts.signal)
    if (fetched) log('%s fetched from the shared tier (%d bytes)', digest, fetched.size)
    return fetched
  } catch (err) {
    if (opts.signal?.aborted) throw opts.signal.reason
    onError(`fetching ${digest} from the shared tier`, err)
    return undefined
  }
}

/** An instance manifest from the tier (fetched into `dir`, its bytes checked), or undefined. */
export async function manifestFromTier(
  tier: SharedTier,
  dir: string,
  digest: Digest,
  opts: CallOptions,
  onError: CacheErrorHandler,
): Promise<{ bytes: Buffer; mediaType: string } | undefined> {
  const fetched = await fetchFromTier(tier, dir, { digest, size: -1 }, opts, onError)
  if (!fetched || fetched.size > MAX_MANIFEST_SIZE) return undefined
  try {
    const bytes = await readFile(fetched.path, { signal: opts.signal, flag: READ_NOFOLLOW })
    const mediaType = guessMediaType(bytes)
    if (mediaType === '' || digestOf(bytes, digestAlgorithm(digest)) !== digest) return undefined
    log('manifest %s from the shared tier', digest)
    return { bytes, mediaType }
  } catch (err) {
    if (opts.signal?.aborted) throw opts.signal.reason
    onError(`reading manifest ${digest} fetched from the shared tier`, err)
    return undefined
  }
}

/**
 * Fetches the substitutes that only the tier holds into `dir`, a few at once, so that a copy
 * does not depend on the tier staying reachable: a substitute that cannot be fetched is
 * replaced by undefined in `subs` (the layer is then copied as it is).
 */
export async function prefetchSubstitutes(
  tier: SharedTier,
  dir: string,
  subs: (BlobInfo | undefined)[],
  opts: CallOptions,
  onError: CacheErrorHandler,
): Promise<void> {
  const wanted: number[] = []
  for (const [i, sub] of subs.entries()) {
    if (sub?.digest && (await fileSize(join(dir, sub.digest)).catch(() => undefined)) === undefined) wanted.push(i)
  }
  const next = async (): Promise<void> => {
    for (let i = wanted.shift(); i !== undefined; i = wanted.shift()) {
      if (!(await fetchFromTier(tier, dir, subs[i]!, opts, onError))) {
        log('substitute %s is not available from the shared tier; keeping the layer', subs[i]!.digest)
        subs[i] = undefined
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(PREFETCH_CONCURRENCY, wanted.length) }, next))
}
