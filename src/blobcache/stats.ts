// Hit, miss and error counters: one set per opened source or destination, each also adding to
// the set of the BlobCache it came from, so a caller can read totals over a whole copy.

/** Counts of what a blob cache did. */
export interface CacheStats {
  /** Blobs and manifests served from the cache (reads, and destination reuse). */
  hits: number
  /** Reads the cache could not serve, which went to the wrapped source. */
  misses: number
  /** Cache failures: unreadable or unwritable entries, failed notes or variants. None fails a copy. */
  errors: number
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
