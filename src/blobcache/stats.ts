// Hit, miss and error counters: one set per opened source or destination, each also adding to
// the set of the BlobCache it came from, so a caller can read totals over a whole copy. A shared
// tier keeps its own counts, which the BlobCache reports beside these.
import type { SharedStats } from './shared/tier.js'

/** Counts of what a blob cache did. */
export interface CacheStats {
  /** Blobs and manifests served from the cache (reads, and destination reuse). */
  hits: number
  /** Reads the cache could not serve, which went to the wrapped source. */
  misses: number
  /** Cache failures: unreadable or unwritable entries, failed notes or variants. None fails a copy. */
  errors: number
  /** The shared tier's counts; present only when the cache has a tier. */
  shared?: SharedStats
}

/** All-zero shared tier counts (what flushing a cache without a tier resolves). */
export function emptySharedStats(): SharedStats {
  return {
    hits: 0, misses: 0, errors: 0, warnings: 0, uploaded: 0, mounted: 0, skipped: 0, notesMerged: 0,
    dropped: 0, failed: 0, pending: 0, bytesUploaded: 0, bytesDownloaded: 0,
  }
}

/** Mutable counters that also count into a parent. */
export class Counters implements CacheStats {
  hits = 0
  misses = 0
  errors = 0

  constructor(readonly parent?: Counters) {}

  /** Counts a hit. */
  hit(): void {
    this.hits++
    this.parent?.hit()
  }

  /** Counts a miss. */
  miss(): void {
    this.misses++
    this.parent?.miss()
  }

  /** Counts a cache failure. */
  error(): void {
    this.errors++
    this.parent?.error()
  }

  /** A copy of the current counts. */
  snapshot(): CacheStats {
    return { hits: this.hits, misses: this.misses, errors: this.errors }
  }
}
